"""qcore demo: quantize a model to 4-bit NF4 with bitsandbytes on load, on CPU, save it, reload it.

pip install ./core ./plugins/bnb
python examples/demo.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import qcore
from qcore_bnb import BitsAndBytesConfig


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 4 * dim)
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff_out(nn.functional.gelu(self.ff_in(self.norm(x))))


class DemoTransformer(qcore.ModelMixin):
    """A small transformer-shaped model; its __init__ arguments are its config.json."""

    def __init__(self, dim: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x)


def size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def main() -> None:
    torch.manual_seed(0)
    original = DemoTransformer().to(torch.bfloat16).eval()
    x = torch.randn(2, 16, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = original(x)

    with tempfile.TemporaryDirectory() as tmp:
        bf16_dir, nf4_dir = Path(tmp, "bf16"), Path(tmp, "nf4")
        original.save_pretrained(bf16_dir)

        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        model = DemoTransformer.from_pretrained(
            bf16_dir, quantization_config=config, torch_dtype=torch.bfloat16
        )
        with torch.no_grad():
            out = model(x)
        rel = ((out.float() - reference.float()).norm() / reference.float().norm()).item()

        model.save_pretrained(nf4_dir)
        reloaded = DemoTransformer.from_pretrained(nf4_dir, torch_dtype=torch.bfloat16)
        with torch.no_grad():
            out_reloaded = reloaded(x)

        layer = type(model.blocks[0].ff_in)
        print(
            f"backend:            {qcore.get_backend('bitsandbytes').distribution} "
            f"(quant_method {model.quantization_method!r}, layers {layer.__module__}.{layer.__name__})"
        )
        print(
            f"checkpoint size:    bf16 {size_mb(bf16_dir):.2f} MiB -> nf4 {size_mb(nf4_dir):.2f} MiB "
            f"({size_mb(bf16_dir) / size_mb(nf4_dir):.1f}x smaller)"
        )
        print(f"relative error:     {rel:.4f} (nf4 output vs bf16 output)")
        print(f"reload identical:   {torch.equal(out, out_reloaded)}")


if __name__ == "__main__":
    main()
