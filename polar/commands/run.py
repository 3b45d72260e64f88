"""``polar run``: answer one question with a given program, or with a program a trained
predictor writes for it (the deployable path: predictor + engine)."""

from __future__ import annotations

import argparse
import time

from polar.flags import non_negative_int, positive_int

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="answer a question under a program of layers")
    p.add_argument("--model_path", default=None, help=f"hub id, local dir or .gguf (default {DEFAULT_MODEL}, or the checkpoint's model)")
    p.add_argument("--question", required=True, help="the question text")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--program", default="full", help='layers to run, e.g. "0-5,5,6-29" or "full" (default)')
    group.add_argument("--checkpoint", default=None, help="a trained predictor checkpoint: it writes the program")
    p.add_argument("--prompt_style", default=None, help="plain, chat, chat_nothink or raw (no math prompt); default per model")
    p.add_argument("--fewshot", type=non_negative_int, default=0, help="worked examples prepended to the prompt")
    p.add_argument("--answer_mode", default="boxed", choices=["boxed", "lenient"])
    p.add_argument("--max_new_tokens", type=positive_int, default=50)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code from the hub (off by default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polar.programs import format_program, parse_program

    if not args.checkpoint and args.program.strip().lower() not in ("full", "all"):
        parse_program(args.program)  # a malformed program fails before torch and the model load

    from polar.engine import ProgramRunner
    from polar.math import extract_answer
    from polar.prompts import default_prompt_style, format_prompt
    checkpoint_info = None
    model_path = args.model_path
    if args.checkpoint:
        from polar.predictor import load_checkpoint_info

        checkpoint_info = load_checkpoint_info(args.checkpoint)
        model_path = model_path or checkpoint_info.get("model_path")
    model_path = model_path or DEFAULT_MODEL

    runner = ProgramRunner.from_pretrained(
        model_path, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    style = args.prompt_style or (checkpoint_info or {}).get("prompt_style") or default_prompt_style(
        model_path, getattr(runner.config, "model_type", None)
    )
    if args.checkpoint:
        from polar.predictor import predict_programs

        program = predict_programs(args.checkpoint, [args.question], runner=runner, top_k=1)[0][0]
    else:
        program = parse_program(args.program, runner.num_layers)

    prompt = args.question if style == "raw" else format_prompt(args.question, style, runner.tokenizer, fewshot=args.fewshot)
    start = time.perf_counter()
    gen = runner.generate([prompt], [program], max_new_tokens=args.max_new_tokens)[0]
    seconds = time.perf_counter() - start
    answer = extract_answer(gen.text, args.answer_mode)
    print(gen.text.strip())
    print(f"answer: {answer if answer is not None else '(none found)'}")
    print(f"program: {format_program(program)}  ({len(program)} of {runner.num_layers} layers)")
    print(f"time: {seconds:.2f} s for {len(gen.token_ids)} tokens")
    return 0
