"""The original fDNC matcher (NIT_Registration) in PyTorch, from REFERENCE.md, for benchmarks only.

Not part of the package and never imported by it: torch is a benchmark-only extra
(``pip install fdnc_jax[bench]``). The architecture follows the paper's description:

1. Per-point embedding: ``Conv1d(3 → 128, kernel 1)`` + ``BatchNorm1d(128)`` over the points.
2. Template tokens get ``+1`` on every feature; no positional encoding.
3. Sequence ``[template ; test]`` in the original ``(seq, batch, feature)`` layout
   (``batch_first=False``) through ``nn.TransformerEncoder``: 6 layers, d_model 128, 8 heads,
   feed-forward 2048, dropout 0.1, ReLU, post-norm, padding masked with ``src_key_padding_mask``.
4. ``S = v · uᵀ`` by ``bmm`` ([B, M, N], padded template columns masked), an outlier column
   ``Linear(128 → 1)(v)`` appended, ``log_softmax`` over the N + 1 columns.

Parameters: the original kept the prototype ``nn.TransformerEncoderLayer`` as a sub-module next to
the ``TransformerEncoder`` that deep-copies it 6 times, so its parameter count (the paper's
"4.15 M") includes a 7th, unused layer. The forward pass uses ≈ 3.56 M. ``count_params`` returns
both.

``from_fdnc(model)`` loads the parameters of a ``fdnc_jax`` Model of the same sizes (trained
weights, e.g. ``fdnc_jax.load_pretrained()``), so both implementations compute the same function;
``canonical_pose`` is ``fdnc_jax.pose.canonical_pose`` in torch, for canonical-pose models.

Run ``python benchmarks/torch_reference.py`` to print the two counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NEG_INF = -1e9


class NITRegistration(nn.Module):
    """The fDNC transformer matcher, original layout and sizes.

    Args:
      input_dim: 3 (positions).
      width: d_model (128).
      layers: encoder layers (6).
      heads: attention heads (8).
      ff_width: feed-forward width (2048).
      dropout: dropout in attention and feed-forward (0.1; inactive in eval mode).
      keep_prototype: register the prototype encoder layer as a sub-module (as the original did;
        it holds parameters but is not used in the forward pass).
    """

    def __init__(
        self,
        input_dim: int = 3,
        width: int = 128,
        layers: int = 6,
        heads: int = 8,
        ff_width: int = 2048,
        dropout: float = 0.1,
        keep_prototype: bool = True,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.point_f = nn.Conv1d(input_dim, width, kernel_size=1)
        self.bn = nn.BatchNorm1d(width)
        layer = nn.TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=ff_width,
            dropout=dropout,
            activation="relu",
            batch_first=False,
            norm_first=False,
            layer_norm_eps=layer_norm_eps,
        )
        self.enc = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        if keep_prototype:
            self.enc_l = layer  # The original's unused prototype layer (counted in its 4.15 M).
        self.fc_outlier = nn.Linear(width, 1)

    def embed(self, pts: torch.Tensor) -> torch.Tensor:
        """pts [B, L, 3] → [L, B, D] (original layout: sequence first)."""
        x = self.bn(self.point_f(pts.transpose(1, 2)))  # [B, D, L]
        return x.permute(2, 0, 1)

    def forward(
        self,
        template: torch.Tensor,
        template_mask: torch.Tensor,
        test: torch.Tensor,
        test_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Log-probabilities of each test point's match, in model units.

        Args:
          template: [B, N, 3]; template_mask: [B, N] bool, True = valid.
          test: [B, M, 3]; test_mask: [B, M] bool, True = valid.

        Returns:
          [B, M, N + 1] log-probabilities; column N is the outlier column.
        """
        n = template.shape[1]
        x = torch.cat([self.embed(template) + 1.0, self.embed(test)], dim=0)  # [N + M, B, D]
        pad = ~torch.cat([template_mask, test_mask], dim=1)  # [B, N + M], True = padding
        x = self.enc(x, src_key_padding_mask=pad)
        u = x[:n].transpose(0, 1)  # [B, N, D]
        v = x[n:].transpose(0, 1)  # [B, M, D]
        scores = torch.bmm(v, u.transpose(1, 2))  # [B, M, N]
        scores = scores.masked_fill(~template_mask[:, None, :], NEG_INF)
        outlier = self.fc_outlier(v)  # [B, M, 1]
        return torch.log_softmax(torch.cat([scores, outlier], dim=2), dim=2)


def canonical_pose(xyz: torch.Tensor) -> torch.Tensor:
    """``fdnc_jax.pose.canonical_pose`` of unpadded clouds: [..., P, 3] → [..., P, 3] (principal
    axes, largest spread first, signs by skewness, proper rotation; centred on the mean)."""
    centred = xyz - xyz.mean(dim=-2, keepdim=True)
    cov = centred.mT @ centred / xyz.shape[-2]
    _, vecs = torch.linalg.eigh(cov)
    axes = vecs.flip(-1)  # Largest variance first.
    skew = ((centred @ axes) ** 3).sum(dim=-2)  # [..., 3]
    sign = torch.where(skew[..., :2] >= 0, 1.0, -1.0)
    third = torch.linalg.det(axes) * sign[..., 0] * sign[..., 1]
    return centred @ (axes * torch.cat([sign, third[..., None]], dim=-1)[..., None, :])


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def from_fdnc(model) -> NITRegistration:
    """A NITRegistration (eval mode) holding the parameters of a ``fdnc_jax`` Model.

    Maps ``Linear(3 → D)`` of 4 × positions to the Conv1d (BatchNorm left as identity), the
    [D, H, Dh] query/key/value kernels to ``in_proj_weight`` (heads are contiguous Dh-blocks in
    both), and uses the Flax LayerNorm epsilon (1e-6). Position-only models.
    """
    from flax import nnx

    cfg = model.config
    if cfg.color_features or cfg.distance_bias:
        raise ValueError("from_fdnc: the original architecture only (positions, no distance bias)")
    p = nnx.to_pure_dict(model.params)
    net = NITRegistration(
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        ff_width=cfg.ff_width,
        dropout=0.0,
        keep_prototype=False,
        layer_norm_eps=1e-6,
    ).eval()
    d = cfg.width
    scale = model.module().embed.position_scale
    with torch.no_grad():
        net.point_f.weight.copy_(
            _t(np.asarray(p["embed"]["linear"]["kernel"]).T[:, :, None] * scale)
        )
        net.point_f.bias.copy_(_t(p["embed"]["linear"]["bias"]))
        net.bn.running_var.fill_(1.0 - net.bn.eps)  # BatchNorm = identity.
        for i, layer in enumerate(net.enc.layers):
            b = p["blocks"][i]
            a = b["attention"]
            w = [np.asarray(a[k]["kernel"]).reshape(d, d).T for k in ("query", "key", "value")]
            layer.self_attn.in_proj_weight.copy_(_t(np.concatenate(w, axis=0)))
            layer.self_attn.in_proj_bias.copy_(
                _t(
                    np.concatenate(
                        [np.asarray(a[k]["bias"]).reshape(d) for k in ("query", "key", "value")]
                    )
                )
            )
            layer.self_attn.out_proj.weight.copy_(
                _t(np.asarray(a["out"]["kernel"]).reshape(d, d).T)
            )
            layer.self_attn.out_proj.bias.copy_(_t(a["out"]["bias"]))
            layer.linear1.weight.copy_(_t(np.asarray(b["ff_in"]["kernel"]).T))
            layer.linear1.bias.copy_(_t(b["ff_in"]["bias"]))
            layer.linear2.weight.copy_(_t(np.asarray(b["ff_out"]["kernel"]).T))
            layer.linear2.bias.copy_(_t(b["ff_out"]["bias"]))
            for norm, ours in ((layer.norm1, b["norm_attention"]), (layer.norm2, b["norm_ff"])):
                norm.weight.copy_(_t(ours["scale"]))
                norm.bias.copy_(_t(ours["bias"]))
        net.fc_outlier.weight.copy_(_t(np.asarray(p["outlier"]["kernel"]).T))
        net.fc_outlier.bias.copy_(_t(p["outlier"]["bias"]))
    return net


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all registered parameters as the original counted them, parameters used in the forward)."""
    total = sum(p.numel() for p in model.parameters())
    proto = getattr(model, "enc_l", None)
    unused = sum(p.numel() for p in proto.parameters()) if proto is not None else 0
    return total, total - unused


if __name__ == "__main__":
    total, forward = count_params(NITRegistration())
    print(
        f"NIT_Registration parameters: {total:,} with the prototype layer (paper: 4.15 M), "
        f"{forward:,} in the forward pass"
    )
