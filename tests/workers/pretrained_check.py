"""Rank program: the CLI's replica started from a saved Llama (`model.name_or_path`) against
`AutoModelForCausalLM.from_pretrained` of the same folder, on every group.

4 ranks, K = 2 groups of S = 2. For each case the job is built exactly as `codistill-ds train`
builds it (`run.job.build_job`, config from tests/tiny_test.yaml plus the case's overrides); then
every parameter is gathered over its group (ZeRO-3 partitions, FSDP2/TP DTensor shards) and
compared with from_pretrained's bit for bit, and eval-mode logits on a fixed batch (TP: the
vocabulary slices gathered) are compared with from_pretrained's. The elements each rank read
from the file (what `SafetensorsFolder.read_box`/`read_flat` returned, counted around them) are
recorded beside the elements it holds.

  fsdp     FSDP2 over the group (D = 2)
  tp       FSDP2 + DTensor TP (T = 2)
  hsdp     HSDP (R = 2)
  zero3    DeepSpeed ZeRO-3 over the group
  zero2    DeepSpeed ZeRO-2 (every rank holds the whole replica)
  tied     FSDP2 from TIED: tied embeddings, weights stored in bf16 (cast to fp32 on load)
  tied_z3  ZeRO-3 from TIED

Args: OUT UNTIED TIED. UNTIED has a tokenizer of fewer ids than the model's vocabulary
(`data.tokenizer` left at its default, "auto"). Writes OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from codistill_ds.backends import pretrained
from codistill_ds.backends.materialize import gathered_state_dict
from codistill_ds.backends.replica import clean_name
from codistill_ds.config import load_config
from codistill_ds.distributed import env as rankinfo
from codistill_ds.distributed.env import exit_process, shutdown
from codistill_ds.run.job import build_job

REPO = Path(__file__).resolve().parents[2]
CASES = {
    "fsdp": ("untied", ["backend.name=fsdp"]),
    "tp": ("untied", ["backend.name=fsdp", "parallel.tp=2"]),
    "hsdp": ("untied", ["backend.name=fsdp", "parallel.replicate=2"]),
    "zero3": ("untied", ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"]),
    "zero2": ("untied", ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero2.json"]),
    "tied": ("tied", ["backend.name=fsdp"]),
    "tied_z3": ("tied", ["backend.name=deepspeed", "backend.ds_config=ds_configs/zero3.json"]),
}


READ = [0]


def count_reads() -> None:
    """Count the elements every read returns (the reads themselves are the library's)."""
    cls = pretrained.SafetensorsFolder
    box, flat = cls.read_box, cls.read_flat

    def read_box(self, *args):
        out = box(self, *args)
        READ[0] += out.numel()
        return out

    def read_flat(self, *args):
        out = flat(self, *args)
        READ[0] += out.numel()
        return out

    cls.read_box, cls.read_flat = read_box, read_flat


def reference(folder: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


def probe(vocab: int) -> torch.Tensor:
    return (torch.arange(2 * 16).view(2, 16) * 7) % vocab


def run_case(name: str, folder: str, overrides: list[str], out: Path) -> dict:
    cfg = load_config(str(REPO / "tests" / "tiny_test.yaml"), [
        f"model.name_or_path={folder}", f"run_dir={out / name}", "data.seq_len=16", "codistill.topk=4",
        "codistill.dtype=fp32", *overrides])
    READ[0] = 0
    job = build_job(cfg)
    read = READ[0]
    ref = reference(folder)
    want = {n: p.detach() for n, p in ref.named_parameters()}
    got = {clean_name(n): t for n, t in gathered_state_dict(job.backend.module).items()}
    unequal = sorted(n for n in want if n not in got or not torch.equal(got[n], want[n]))
    vocab = ref.config.vocab_size
    job.backend.train(False)
    with torch.no_grad():
        logits = job.backend.forward(probe(vocab))
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        ref_logits = ref(input_ids=probe(vocab)).logits
    diff = (logits.float().cpu() - ref_logits).abs().max().item()
    facts = {"case": name, "group": job.topology.group_id, "params": len(want), "compared": len(got),
             "unequal": unequal, "extra": sorted(set(got) - set(want)), "logits_diff": diff,
             "logits_equal": bool(torch.equal(logits.float().cpu(), ref_logits)),
             "tokenizer": job.cfg.data.tokenizer, "logits_vocab": logits.shape[-1], "model_vocab": vocab,
             "n_params": job.n_params, "dtypes": sorted({str(_local(p).dtype) for p in job.backend.module.parameters()}),
             "read": read, "local_numel": sum(_local_numel(p) for p in job.backend.module.parameters()),
             "full_numel": sum(p.numel() for p in ref.parameters())}
    if job.transport is not None:
        job.transport.close()
    dist.barrier()
    return facts


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank stores of `p`: its ZeRO-3 partition, its DTensor shard, or `p`."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def _local_numel(p: torch.Tensor) -> int:
    return _local(p).numel()


def main() -> None:
    out, untied, tied = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rankinfo.prepare_accelerator_env()
    rankinfo.init_distributed()
    count_reads()
    folders = {"untied": untied, "tied": tied}
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else list(CASES)
    runs = [run_case(name, folders[CASES[name][0]], CASES[name][1], out) for name in only]
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps({"rank": dist.get_rank(), "runs": runs}))
    dist.barrier()
    shutdown()
    exit_process(0)


if __name__ == "__main__":
    main()
