"""Heterogeneous groups: different architectures, sizes, backends and rank counts codistill together.

Two jobs over `transport: torchft`, sharing only the exchange contract (byte tokenizer, corpus,
shared-stream seed, exchange batch of 4 sequences, top-k and wire format):
  group 0: a 4-layer Llama, DeepSpeed ZeRO-3 over 2 ranks;
  group 1: a 2-layer GPT-2 shape, FSDP2 on 1 rank, with its own `peer_weights` (group 0 at 0.5).
With one peer a weighted mean equals the plain one, so this run only shows that a group job may
carry weights of its own; the weighting itself (two peers, unequal weights, a 0) is checked
against a hand-computed mean in test_exchange_numbers.py and tests/unit/test_engine.py.
Phase 1 trains 20 steps (checkpoints at 10 and 20); phase 2 resumes both to 30 steps while a
third job, with another vocabulary (a BPE tokenizer built here), asks to join as group 1 and is
refused naming `data.tokenizer`. Then both groups are exported (`codistill-ds export` twice, in one
process) and loaded with `from_pretrained`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import REPO, child_env, free_port, read_jsonl

pytestmark = pytest.mark.timeout(900)

CONFIG = str(REPO / "tests" / "tiny_test.yaml")
STEPS = 200
"""Phase 1 trains 20 steps; phase 2 resumes to STEPS while an intruder tries to join."""
PHASE2 = ["train.save_interval=50", "train.eval_interval=50"]
COMMON = ["codistill.alpha=1", "codistill.transport=torchft", "data.exchange_batch_size=4", "train.save_interval=10",
          "train.eval_interval=10", "codistill.exchange_timeout_s=20"]
GROUP = {
    0: (2, ["model.arch=llama", "model.num_layers=4", "backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"]),
    1: (1, ["model.arch=gpt2", "model.num_layers=2", "backend.name=fsdp", "codistill.peer_weights=[[0, 0.5]]"]),
}


def job(g: int, nproc: int, url: str, run: Path, extra: list[str], log: Path) -> subprocess.Popen:
    sets = [*COMMON, *GROUP[g][1], f"codistill.group_id={g}", f"codistill.lighthouse={url}", f"run_dir={run}", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "codistill_ds.cli", "train", "--config", CONFIG, "--set", *sets]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _last_step(run: Path) -> int:
    recs = read_jsonl(run / "metrics.jsonl")
    return recs[-1]["step"] if recs else 0


def other_tokenizer(path: Path) -> Path:
    """A 300-entry BPE tokenizer trained on a little text: a vocabulary unlike the byte one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = (REPO / "README.md").read_text()[:20000].splitlines()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    from codistill_ds.commands.lighthouse import start_lighthouse

    tmp = tmp_path_factory.mktemp("hetero")
    server, url = start_lighthouse(port=0, bind="127.0.0.1", join_timeout_ms=30000)
    runs = {g: tmp / f"g{g}" for g in GROUP}
    try:
        first = {g: job(g, GROUP[g][0], url, runs[g], ["train.steps=20"], tmp / f"p1_g{g}.log") for g in GROUP}
        codes = {g: p.wait(timeout=600) for g, p in first.items()}
        assert codes == {0: 0, 1: 0}, {g: (tmp / f"p1_g{g}.log").read_text()[-3000:] for g in GROUP}
        second = {g: job(g, GROUP[g][0], url, runs[g], [f"train.steps={STEPS}", "train.resume=auto", *PHASE2], tmp / f"p2_g{g}.log")
                  for g in GROUP}
        tokenizer = other_tokenizer(tmp / "bpe300")
        # The intruder asks to join only once both groups run again: whoever meets first holds the
        # exchange contract, and a job that starts before the groups would be the one refusing
        # them. Phase 2 is long enough (~0.3 s a step) to outlast the intruder's start-up.
        deadline = time.monotonic() + 300
        while not all(_last_step(runs[g]) > 20 for g in GROUP):
            assert time.monotonic() < deadline and all(p.poll() is None for p in second.values()), \
                {g: (tmp / f"p2_g{g}.log").read_text()[-3000:] for g in GROUP}
            time.sleep(0.5)
        intruder = job(1, 1, url, tmp / "intruder", [f"train.steps={STEPS}", f"data.tokenizer={tokenizer}"],
                       tmp / "intruder.log")
        intruder_code = intruder.wait(timeout=600)
        codes = {g: p.wait(timeout=600) for g, p in second.items()}
        assert codes == {0: 0, 1: 0}, {g: (tmp / f"p2_g{g}.log").read_text()[-3000:] for g in GROUP}
    finally:
        server.shutdown()
    return {"tmp": tmp, "runs": runs, "intruder_code": intruder_code,
            "intruder_log": (tmp / "intruder.log").read_text()}


def test_different_models_exchange_save_and_resume(hetero):
    for run in hetero["runs"].values():
        recs = read_jsonl(run / "metrics.jsonl")
        assert [r["step"] for r in recs] == list(range(1, STEPS + 1))  # phase 2 continued from step 20
        assert sum(r["peers"] == 1 for r in recs) >= STEPS - 5, [r["peers"] for r in recs]
        assert all(r["distill_loss"] > 0 for r in recs if r["peers"] == 1)
        assert recs[-1]["val_loss"] < recs[0]["loss"]
        assert recs[-1]["cross_group_bytes"] > 0
    # Same exchange batch and format: both groups sent the same number of bytes per round.
    last = [read_jsonl(run / "metrics.jsonl")[-1] for run in hetero["runs"].values()]
    assert last[0]["cross_group_bytes"] == last[1]["cross_group_bytes"]


def test_each_group_exports_its_own_architecture(hetero, tmp_path):
    from transformers import AutoModelForCausalLM

    outs = {g: tmp_path / f"export{g}" for g in hetero["runs"]}
    argvs = [["export", str(run), "--group", str(g), str(outs[g])] for g, run in hetero["runs"].items()]
    # `codistill-ds export` once per group, in one process (one interpreter start, not one per group)
    code = "import json, sys\nfrom codistill_ds.cli import main\nsys.exit(max(main(a) for a in json.loads(sys.argv[1])))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(argvs)], check=False, cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kinds = {}
    for g, out in outs.items():
        model = AutoModelForCausalLM.from_pretrained(out)
        kinds[g] = (type(model).__name__, model.config.num_hidden_layers if g == 0 else model.config.n_layer)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 256
    assert kinds == {0: ("LlamaForCausalLM", 4), 1: ("GPT2LMHeadModel", 2)}


def test_a_job_with_another_vocabulary_is_refused(hetero):
    assert hetero["intruder_code"] != 0
    errors = [ln for ln in hetero["intruder_log"].splitlines() if "codistill-ds: error" in ln]
    assert errors and "data.tokenizer" in errors[0] and "vocab_size=300" in errors[0], hetero["intruder_log"][-3000:]
    assert "exitcode  : 2" in hetero["intruder_log"]
