"""The LoRA's dtype over a half-precision base: with peft's input cast off (what add_lora sets) a bf16 step
casts at least 3 times fewer tensors per adapted layer and trains to the same loss, bit for bit."""

from __future__ import annotations

from sdtune.bench import casts as C


def test_the_input_cast_is_off_and_its_casts_are_gone_with_the_same_losses():
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet, _ = C._unet(C.WAYS[1])  # built as the trainer builds it
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)

    with_casts, without = C.run(C.WAYS[0], steps=3), C.run(C.WAYS[1], steps=3)
    # Per layer, peft's cast of the input to fp32 and autocast's cast back, in forward and in backward
    # (the cross-attention keys/values take the prompt, which needs no gradient: 2 there).
    assert with_casts["casts"] - without["casts"] >= 3 * len(layers)
    assert without["losses"] == with_casts["losses"]
