"""The Trainer and the own Accelerate loop refuse tensor/context/sequence parallelism and HSDP
(Accelerate 1.15 builds their mesh over the whole world, across the codistillation groups:
integrations/model_parallel.py) with one line naming the CLI's `parallel.tp`. Real Accelerate
`ParallelismConfig`s, real TrainingArguments, a real Trainer construction; one process."""

from __future__ import annotations

import json

import pytest

from codistill_ds.integrations.model_parallel import (
    refuse_model_parallelism,
    requested_model_parallelism,
)


def parallelism(**sizes):
    from accelerate import ParallelismConfig

    return ParallelismConfig(**sizes)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


@pytest.mark.parametrize("sizes, named", [
    ({"tp_size": 2, "dp_shard_size": 2}, ["tp_size=2", "dp_shard_size=2"]),
    ({"dp_replicate_size": 2, "dp_shard_size": 2}, ["dp_replicate_size=2", "dp_shard_size=2"]),
    ({"cp_size": 2, "dp_shard_size": 2}, ["cp_size=2"]),
])
def test_parallelism_configs_that_span_the_world_are_refused(sizes, named):
    with pytest.raises(ValueError) as err:
        refuse_model_parallelism("the Accelerate loop integration", parallelism_config=parallelism(**sizes))
    line = str(err.value)
    assert "\n" not in line and "parallel.tp" in line and "codistill-ds train" in line
    assert all(f"ParallelismConfig {n}" in line for n in named), line


def test_nothing_to_refuse():
    assert requested_model_parallelism(parallelism_config=parallelism(), ds_config={"zero_optimization": {}},
                                       model=tiny_llama(), fsdp=["full_shard", "auto_wrap"]) == []


def test_deepspeed_autotp_is_refused_from_a_dict_or_a_file(tmp_path):
    ds = {"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    for given in (ds, str(path)):
        assert requested_model_parallelism(ds_config=given) == ["DeepSpeed tensor_parallel.autotp_size=2"]


def test_model_loaded_with_tensor_parallelism_is_refused():
    from transformers.distributed import DistributedConfig

    model = tiny_llama()
    model.config.distributed_config = DistributedConfig(tp_size=2)  # what from_pretrained(tp_size=2) records
    assert requested_model_parallelism(model=model) == ["a model loaded with tensor parallelism (tp_size=2)"]


def test_trainer_args_asking_for_tp_stop_codistill_init(tmp_path):
    """`codistill_init` refuses before creating any process group or touching the model."""
    from transformers import TrainingArguments

    from codistill_ds.config import CodistillConfig
    from codistill_ds.integrations.hf_trainer import codistill_init

    args = TrainingArguments(output_dir=str(tmp_path), parallelism_config=parallelism(tp_size=2, dp_shard_size=2),
                             use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"Hugging Face Trainer integration cannot keep ParallelismConfig tp_size=2"):
        codistill_init(CodistillConfig(groups=2), args)


def test_trainer_refuses_a_tensor_parallel_model_before_building_accelerate(tmp_path):
    from transformers import TrainingArguments
    from transformers.distributed import DistributedConfig

    from codistill_ds.config import CodistillConfig
    from codistill_ds.integrations.hf_trainer import CodistillTrainer

    model = tiny_llama()
    model.config.distributed_config = DistributedConfig(tp_size=2)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match=r"tensor parallelism \(tp_size=2\).*parallel\.tp"):
        CodistillTrainer(codistill=CodistillConfig(groups=2, same_init=True), model=model, args=args)


def test_hybrid_shard_is_refused():
    assert requested_model_parallelism(fsdp="hybrid_shard auto_wrap") == ["fsdp hybrid_shard"]
