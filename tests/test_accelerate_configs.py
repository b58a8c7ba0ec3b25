"""The shipped `accelerate launch --config_file` files parse with accelerate's own loader, as the engine named."""
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name, engine", [("ddp", "MULTI_GPU"), ("ddp_multinode", "MULTI_GPU"), ("fsdp", "FSDP"),
                                          ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_config_files_load(name, engine):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert cfg.distributed_type.name == engine
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    if engine == "FSDP":  # the trained UNet is sharded whole, its state saved sharded (resumable)
        assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if engine == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 2


def test_fsdp_is_refused_at_start_with_what_to_use(tmp_path, monkeypatch):
    """fsdp.yaml parses, but the loop refuses FSDP before loading anything (t2i_align.loop._refuse_fsdp says why).
    FSDP needs GPUs, so this uses accelerate's own FSDP type on a stand-in accelerator."""
    import accelerate
    from accelerate.utils import DistributedType

    from t2i_align.config import load_config
    from t2i_align.errors import UserError
    from t2i_align.loop import train

    class FsdpAccelerator:
        distributed_type = DistributedType.FSDP

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", FsdpAccelerator)
    with pytest.raises(UserError, match="FSDP is not supported yet.*configs/accelerate/ddp.yaml"):
        train(load_config(None, [f"output_dir={tmp_path}", "tracking.wandb=off"]))
