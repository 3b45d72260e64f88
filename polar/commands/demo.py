"""``polar demo``: search, train and evaluate on the embedded model, then write a report folder.

Runs offline on a 2-core CPU in under fifteen minutes with the defaults (SmolLM2-135M-Instruct,
generated single-digit additions; docs/demo-choice.md says why). Rerunning reuses finished work.
Flags scale it up, e.g. on a GPU with a stronger model: ``polar demo --model_path
Qwen/Qwen2.5-0.5B-Instruct --question_set math --difficulty 1 --answer_mode boxed --questions 300
--test_questions 200 --simulations 100 --device cuda --out demo-qwen``.
"""

from __future__ import annotations

import argparse
from typing import Any

from polar.flags import int_range, non_negative_int, positive_int, seed, torch_device


def register(subparsers: Any) -> None:
    from polar.demo import ARITHMETIC_SETS, DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded model and write a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=d.out, help=f"report folder (default: {d.out})")
    p.add_argument("--model_path", default=d.model_path, help="hub id, local directory or .gguf file")
    p.add_argument("--question_set", default=d.question_set,
                   help=f"generated {' / '.join(ARITHMETIC_SETS)}, or a polar question set (math, gsm8k, asdiv, ...)"
                        f" (default: {d.question_set})")
    p.add_argument("--difficulty", type=int_range(1, 5), default=d.difficulty, help="level, for sets that have levels (math)")
    p.add_argument("--questions", type=int_range(2, what="an integer >= 2 (train + validation)"), default=d.questions,
                   help=f"questions to search (train + validation; default {d.questions})")
    p.add_argument("--validation", type=non_negative_int, default=d.validation,
                   help=f"of those, how many pick the best epoch (default {d.validation})")
    p.add_argument("--test_questions", type=positive_int, default=d.test_questions,
                   help=f"held-out questions evaluated live (default {d.test_questions})")
    p.add_argument("--simulations", type=positive_int, default=d.simulations, help=f"MCTS simulations per question (default {d.simulations})")
    p.add_argument("--prompt_style", default=d.prompt_style, help=f"plain, chat, chat_nothink (default {d.prompt_style})")
    p.add_argument("--fewshot", type=non_negative_int, default=d.fewshot)
    p.add_argument("--answer_mode", choices=("boxed", "lenient"), default=d.answer_mode)
    p.add_argument("--max_new_tokens", type=positive_int, default=d.max_new_tokens)
    p.add_argument("--encoder", default=d.encoder, help="predictor's question encoder: self, minilm, hash, or an HF id")
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--keep_original", action="store_true",
                   help="keep the full-depth program as a training target even when a shorter one is valid")
    p.add_argument("--top_k", type=positive_int, default=d.top_k, help="programs decoded per question (vote@k, pass@k)")
    p.add_argument("--batch_size", type=positive_int, default=d.batch_size, help="sequences per engine call")
    p.add_argument("--seed", type=seed, default=d.seed)
    p.add_argument("--device", type=torch_device, default=d.device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16, float16 (default: per device)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice; 1 is faster on a machine whose "
                        "cores are busy with other jobs)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the model's and the encoder's own Python code to run (off by default)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from polar.demo import DemoConfig, run_demo
    from polar.io import check_writable_dir

    check_writable_dir(args.out, "--out")

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    config = DemoConfig(
        model_path=args.model_path, question_set=args.question_set, difficulty=args.difficulty,
        prompt_style=args.prompt_style, fewshot=args.fewshot, answer_mode=args.answer_mode,
        max_new_tokens=args.max_new_tokens, questions=args.questions, validation=args.validation,
        test_questions=args.test_questions, simulations=args.simulations, seed=args.seed, encoder=args.encoder,
        epochs=args.epochs, drop_original=not args.keep_original, top_k=args.top_k, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        out=args.out, progress=not args.no_progress,
    )
    report = run_demo(config)
    print(report)
    return 0
