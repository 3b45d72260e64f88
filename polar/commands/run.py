"""``polar run``: answer one question with a given program, or with a program a trained
predictor writes for it (the deployable path: predictor + engine).

With ``--checkpoint`` the run is set up the way the predictor was trained: the base model, prompt
style, answer reading and few-shot count recorded in the checkpoint are the defaults, and flags
given on the command line override them.
"""

from __future__ import annotations

import argparse
import sys
import time

from polar.flags import non_negative_int, positive_int, torch_device

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="answer a question under a program of layers", description=__doc__)
    p.add_argument("--model_path", default=None, help=f"hub id, local dir or .gguf (default {DEFAULT_MODEL}, or the checkpoint's model)")
    p.add_argument("--question", required=True, help="the question text")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--program", default="full", help='layers to run, e.g. "0-5,5,6-29" or "full" (default)')
    group.add_argument("--checkpoint", default=None,
                       help="a trained predictor checkpoint (NAME.safetensors beside NAME.json): it writes the program")
    p.add_argument("--prompt_style", default=None,
                   help="plain, chat, chat_nothink or raw (no math prompt); default: the checkpoint's, else per model")
    p.add_argument("--fewshot", type=non_negative_int, default=None,
                   help="worked examples prepended to the prompt (default: the checkpoint's, else 0)")
    p.add_argument("--answer_mode", default=None, choices=["boxed", "lenient"],
                   help="how the answer is read (default: the checkpoint's, else boxed)")
    p.add_argument("--max_new_tokens", type=positive_int, default=50)
    p.add_argument("--device", type=torch_device, default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the model's (and the checkpoint encoder's) own Python code to run (off by default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polar.programs import format_program, parse_program

    if not args.question.strip():
        raise ValueError("argument --question: the question is empty")
    if not args.checkpoint and args.program.strip().lower() not in ("full", "all"):
        parse_program(args.program)  # a malformed program fails before torch and the model load

    from polar.engine import ProgramRunner
    from polar.errors import check_text
    from polar.math import extract_answer
    from polar.prompts import completion_answer_text, default_prompt_style, format_prompt
    from polar.scoring import check_max_new_tokens

    question = check_text(args.question, "--question")
    trained: dict = {}
    if args.checkpoint:
        from polar.predictor import load_checkpoint_info

        trained = load_checkpoint_info(args.checkpoint)
        recorded = trained.get("model_path")
        if args.model_path and recorded and args.model_path != recorded:
            print(f"note: the checkpoint was trained for {recorded}; running it on {args.model_path}", file=sys.stderr)
    model_path = args.model_path or trained.get("model_path") or DEFAULT_MODEL

    runner = ProgramRunner.from_pretrained(
        model_path, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code
    )
    check_max_new_tokens(runner, args.max_new_tokens)
    style = args.prompt_style or trained.get("prompt_style") or default_prompt_style(model_path)
    answer_mode = args.answer_mode or trained.get("answer_mode") or "boxed"
    fewshot = args.fewshot if args.fewshot is not None else int(trained.get("fewshot") or 0)
    if args.checkpoint:
        from polar.decode import predict_programs

        program = predict_programs(args.checkpoint, [question], runner=runner, top_k=1,
                                   trust_remote_code=args.trust_remote_code)[0][0]
    else:
        program = parse_program(args.program, runner.num_layers)

    prompt = question if style == "raw" else format_prompt(question, style, runner.tokenizer, fewshot=fewshot)
    start = time.perf_counter()
    gen = runner.generate([prompt], [program], max_new_tokens=args.max_new_tokens)[0]
    seconds = time.perf_counter() - start
    answer = extract_answer(gen.text if style == "raw" else completion_answer_text(gen.text, style), answer_mode)
    print(gen.text.strip())
    print(f"answer: {answer if answer is not None else '(none found)'}")
    source = "  (written by the predictor)" if args.checkpoint else ""
    print(f"program: {format_program(program)}  ({len(program)} of {runner.num_layers} layers){source}")
    print(f"time: {seconds:.2f} s for {len(gen.token_ids)} tokens")
    return 0
