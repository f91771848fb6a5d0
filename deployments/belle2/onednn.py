"""Whisper's linear layers on oneDNN instead of MKL's sgemm, for CPU replicas.

PyTorch's CPU `nn.Linear` calls MKL's sgemm. For the matrices of decoding (a few rows: the
beams of a few windows) sgemm reads the weights at a fraction of the machine's bandwidth;
oneDNN's inner-product kernel on weights kept in its own blocked layout
(`torch.utils.mkldnn.MkldnnLinear`) ran them 1.6-2.7x as fast on the 2-vCPU test machine (the
51,865-word output layer on 5 beams: 12.1 -> 7.5 ms per step), and the encoder's 1500-row
matrices up to 2x as fast (2048 -> 512: 0.52-0.58 of the time). Whole clips in the app took
0.57-0.75 of the time, with the same segments on every Mandarin clip in tests/data and on the
87 s concatenation. The kernels sum in another order, so logits agree to float rounding (about
1e-6 relative), not bit for bit. Plain Python at import; torch comes in with the model.
"""

from __future__ import annotations

from typing import Any


def use_onednn_linears(model: Any) -> int:
    """Swaps every float32 CPU `nn.Linear` of `model` for a oneDNN one, in place; returns how many.

    Whisper's output layer shares its weights with the token embedding: the swap keeps a oneDNN
    copy of them (the vocabulary x d_model floats again: 106 MB for base, 265 MB for large-v3).
    """
    import torch
    from torch.utils.mkldnn import MkldnnLinear

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, MkldnnLinear(child, torch.float32))
                swapped += 1
    return swapped


def use_dense_linears(model: Any) -> int:
    """Undoes `use_onednn_linears`: every oneDNN linear back to a plain `nn.Linear`; returns how many.

    The output layer gets its weights back from the token embedding it was tied to, where they
    are equal, so an undo costs no memory there.
    """
    import torch
    from torch.utils.mkldnn import MkldnnLinear

    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    restored = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MkldnnLinear):
                weight = child.weight.to_dense()
                dense = torch.nn.Linear(weight.shape[1], weight.shape[0])  # MkldnnLinear always has a bias (zeros if none)
                with torch.no_grad():
                    if embedding is not None and embedding.shape == weight.shape and torch.equal(embedding, weight):
                        dense.weight = embedding
                    else:
                        dense.weight.copy_(weight)
                    dense.bias.copy_(child.bias.to_dense())
                setattr(parent, name, dense)
                restored += 1
    return restored
