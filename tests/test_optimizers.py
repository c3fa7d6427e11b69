"""bitsandbytes' 8-bit and paged AdamW as the trainer's optimizer: they train like AdamW, keep small states, resume."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tsugiki import LoraConfig, get_peft_model
from tsugiki.train.config import ConfigError
from test_train_loop import Crash, assert_all_equal, random_examples, run, trainable

bnb = pytest.importorskip("bitsandbytes")


def model_with_big_adapters(seed=0):
    """LoRA matrices of 64 x 64 = 4096 elements: the size from which bitsandbytes keeps 8-bit states."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=64, lora_alpha=64, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("name, cls", [("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit"),
                                       ("paged_adamw", "PagedAdamW")])
def test_bnb_optimizers_train_close_to_adamw(tmp_path, name, cls):
    rows = random_examples(16)
    start = trainable(model_with_big_adapters())
    kw = dict(batch_size=4, max_steps=4, learning_rate=1e-3)
    reference, _ = run(tmp_path / "adamw", rows, model_with_big_adapters(), **kw)
    trainer, _ = run(tmp_path / name, rows, model_with_big_adapters(), optimizer=name, **kw)
    assert type(trainer.optimizer).__name__ == cls
    if name.endswith("8bit"):  # 1 byte per moment for tensors of 4096+ elements, fp32 below
        kinds = {p.numel() >= 4096: s["state1"].dtype for p, s in trainer.optimizer.state.items()}
        assert kinds == {True: torch.uint8, False: torch.float32}
    want, got = trainable(reference.model), trainable(trainer.model)
    for key in want:
        moved = (want[key] - start[key]).norm()
        assert moved > 0 and (got[key] - want[key]).norm() <= 0.05 * moved, key  # 8-bit states: ~1% here


def test_resume_with_8bit_adamw_is_bitwise_identical(tmp_path):
    rows = random_examples(12)
    kw = dict(batch_size=2, grad_accum=2, max_steps=4, save_steps=2, optimizer="adamw_8bit", learning_rate=1e-3)
    straight, _ = run(tmp_path / "straight", rows, model_with_big_adapters(), **kw)

    def crash_at_3(trainer, record):
        if record["step"] == 3:
            raise Crash()

    with pytest.raises(Crash):
        run(tmp_path / "crashy", rows, model_with_big_adapters(), callbacks=[crash_at_3], **kw)
    resumed, result = run(tmp_path / "crashy", rows, model_with_big_adapters(), **kw)
    assert result.metrics["resumed_from"].endswith("checkpoint-2")
    assert_all_equal(trainable(straight.model), trainable(resumed.model))


def test_resume_refuses_another_optimizer(tmp_path):
    rows = random_examples(8)
    run(tmp_path / "r", rows, model_with_big_adapters(), batch_size=2, max_steps=2, save_steps=2)
    with pytest.raises(ConfigError, match="optimizer: 'adamw' -> 'adamw_8bit'"):
        run(tmp_path / "r", rows, model_with_big_adapters(), batch_size=2, max_steps=4, save_steps=2,
            optimizer="adamw_8bit")


def test_unknown_optimizer_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="optimizer.*adamw, adamw_8bit, paged_adamw, paged_adamw_8bit.*'adamw_8bit'"):
        run(tmp_path / "r", random_examples(4), model_with_big_adapters(), optimizer="adam8bit")
