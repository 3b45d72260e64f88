"""Search under torchrun: 2 ranks on CPU (gloo) merge into exactly the single-process result."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from polar.distributed import Launch, can_rendezvous, launch_from_env
from test_search import _search_args, strip_timing


def test_launch_layout_from_the_launcher_environment():
    assert launch_from_env({}) == Launch(0, 1, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert launch_from_env(env) == Launch(3, 4, 1)
    assert not can_rendezvous(env)  # no MASTER_ADDR: last shard to finish merges instead
    assert can_rendezvous({**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merged(out_dir) -> list[dict]:
    [path] = list(out_dir.rglob("merged_mcts_samples.json"))
    return sorted(strip_timing(json.loads(path.read_text())["samples"]), key=lambda s: s["index"])


def test_two_torchrun_ranks_equal_one_process(tiny_model_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", POLAR_CACHE=str(tmp_path / "cache"))
    args = [str(a) for a in _search_args(tiny_model_dir, tmp_path / "two", "--limit", 5)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "polar", "search"]
    done = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "two").rglob("shard-*"))
    assert shards == ["shard-00000-of-00002.json", "shard-00001-of-00002.json"]

    single = [str(a) for a in _search_args(tiny_model_dir, tmp_path / "one", "--limit", 5)]
    done = subprocess.run([sys.executable, "-m", "polar", "search", *single], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    two, one = _merged(tmp_path / "two"), _merged(tmp_path / "one")
    assert len(one) == 5 and two == one
