"""Published widths of the model families the benchmarks and `benchmarks/memory_plan.py` use (no download).

name: (hidden, intermediate, heads, kv heads, head_dim, layers, tied embeddings); vocabulary 151,936.
"""

VOCAB = 151_936

SHAPES = {
    "qwen3-0.6b": (1024, 3072, 16, 8, 128, 28, True),
    "qwen3-1.7b": (2048, 6144, 16, 8, 128, 28, True),
    "qwen3-4b": (2560, 9728, 32, 8, 128, 36, True),
    "qwen3-8b": (4096, 12288, 32, 8, 128, 36, False),
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128, 28, True),
    "qwen2.5-3b": (2048, 11008, 16, 2, 128, 36, True),
}

# the benchmarks' historical table without the layer count: (hidden, intermediate, heads, kv, head_dim, tied)
QWEN3 = {name: (*s[:5], s[6]) for name, s in SHAPES.items() if name.startswith("qwen3")}


def parameters(name: str) -> int:
    """Parameter count from the shapes (Qwen2.5 adds q/k/v biases; Qwen3 adds q/k norms)."""
    h, inter, heads, kv, hd, layers, tied = SHAPES[name]
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    attn += (heads * hd + 2 * kv * hd) if name.startswith("qwen2.5") else 2 * hd
    layer = attn + 3 * h * inter + 2 * h
    return layers * layer + VOCAB * h * (1 if tied else 2) + h
