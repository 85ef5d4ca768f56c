"""The Conformer encoder of CoverHunter (from WeNet/ESPnet), with the original's attribute
names so that a CoverHunter(MPS) ``state_dict`` loads with ``strict=True``:

    x [B, T, F]
      -> Conv2dSubsampling4 ("embed")          [B, T', D]   T' = ((T - 1) // 2 - 1) // 2
      -> x * sqrt(D), sinusoidal table rows     pos_emb [1, T', D]
      -> num_blocks x ConformerBlock            [B, T', D]
      -> after_norm (LayerNorm)                 [B, T', D]

with D = ``encoder.output_dims``. No padding masks: the original always passes full items.
Kept on purpose (fact sheet 5.1, 13.2.11): the attention's Transformer-XL relative shift is
disabled, as in the original (its second score term is content x *absolute* key position), or
trained checkpoints would compute other embeddings. The positional table (not in the
``state_dict``) grows on demand past the original's 5000 rows; those rows stay identical."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chlib.core.errors import ConfigError, FeatureError

__all__ = ["subsampled_length", "sinusoid_table", "Conv2dSubsampling4", "RelPositionalEncoding",
           "RelPositionMultiHeadAttention", "FeedForward", "ConvModule", "ConformerBlock",
           "ConformerEncoder"]

LAYER_NORM_EPS = 1e-5  # every LayerNorm of the original encoder
POS_TABLE_ROWS = 5000  # initial size of the positional table (the original's hard limit)
MIN_FRAMES = 7  # shortest input the two stride-2 3x3 convolutions accept


def subsampled_length(n_frames: int) -> int:
    """Frames left after the 4x conv subsampling of ``n_frames`` model frames (1125 -> 280)."""
    return ((n_frames - 1) // 2 - 1) // 2


def sinusoid_table(n_positions: int, dim: int) -> Tensor:
    """Sinusoidal position table, float32 [n_positions, dim]: sin in even, cos in odd columns,
    computed as the original does so that rows agree bit for bit on CPU."""
    position = torch.arange(0, n_positions, dtype=torch.float32).unsqueeze(1)  # [P, 1]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class Conv2dSubsampling4(nn.Module):
    """Two 3x3 stride-2 convolutions with ReLU, then a linear projection: time / 4.
    ``[B, T, F] -> [B, T', width]``, T' = :func:`subsampled_length` (T); the frequency axis
    (96 bins -> 23) is folded into the projection."""

    def __init__(self, input_dim: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, width, kernel_size=3, stride=2), nn.ReLU(),
                                  nn.Conv2d(width, width, kernel_size=3, stride=2), nn.ReLU())
        self.out = nn.Sequential(nn.Linear(width * subsampled_length(input_dim), width))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x.unsqueeze(1))  # [B, 1, T, F] (one input channel) -> [B, C, T', F']
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # [B, T', C*F'], channel-major per frame
        return self.out(x)  # [B, T', C]


class RelPositionalEncoding(nn.Module):
    """``x [B, T', D] -> (dropout(x * sqrt(D)), dropout(pos_emb [1, T', D]))``, two masks as in
    the original; the table is a non-persistent buffer, rebuilt larger for longer inputs."""

    def __init__(self, dim: int, dropout: float, max_len: int = POS_TABLE_ROWS) -> None:
        super().__init__()
        self.dim = dim
        self.xscale = math.sqrt(dim)
        self.dropout = nn.Dropout(dropout)
        self.pos_dropout = nn.Dropout(dropout)
        self.register_buffer("table", sinusoid_table(max_len, dim), persistent=False)

    def _rows(self, n: int) -> Tensor:
        if n > self.table.shape[0]:
            grown = max(n, 2 * self.table.shape[0])  # amortise: grow by doubling
            self.table = sinusoid_table(grown, self.dim).to(self.table.device)  # CPU-built, moved
        return self.table[:n]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pos_emb = self._rows(x.shape[1]).to(x.dtype).unsqueeze(0)  # [1, T', D]
        return self.dropout(x * self.xscale), self.pos_dropout(pos_emb)


class RelPositionMultiHeadAttention(nn.Module):
    """Multi-head self-attention with learned content and position biases (WeNet "rel_selfattn").
    Per head, with p = linear_pos(pos_emb): ``scores = ((q + pos_bias_u) k^T + (q + pos_bias_v)
    p^T) / sqrt(d_k)``, **no relative shift** (see the module docstring); softmax over keys, no
    attention dropout, then ``linear_out``."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ConfigError(f"attention width {dim} must be divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.d_k = dim // n_heads
        # Registered first so that the state_dict order matches the original's.
        self.pos_bias_u = nn.Parameter(torch.empty(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(n_heads, self.d_k))
        self.linear_q, self.linear_k, self.linear_v, self.linear_out = (
            nn.Linear(dim, dim) for _ in range(4))
        self.linear_pos = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.d_k)  # [B, T, H, d_k]

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        """``x`` [B, T', D], ``pos_emb`` [1, T', D] -> [B, T', D]."""
        b, t, d = x.shape
        q = self._heads(self.linear_q(x))  # [B, T', H, d_k]
        k = self._heads(self.linear_k(x)).transpose(1, 2)  # [B, H, T', d_k]
        v = self._heads(self.linear_v(x)).transpose(1, 2)  # [B, H, T', d_k]
        p = self._heads(self.linear_pos(pos_emb)).transpose(1, 2)  # [1, H, T', d_k]
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # [B, H, T', d_k]
        q_v = (q + self.pos_bias_v).transpose(1, 2)  # [B, H, T', d_k]
        content = q_u @ k.transpose(-2, -1)  # [B, H, T', T'] query x key content
        position = q_v @ p.transpose(-2, -1)  # [B, H, T', T'] query x absolute key position
        attn = torch.softmax((content + position) / math.sqrt(self.d_k), dim=-1)  # over keys
        return self.linear_out((attn @ v).transpose(1, 2).reshape(b, t, d))  # heads concatenated


class FeedForward(nn.Module):
    """Linear(dim -> hidden), SiLU, dropout, Linear(hidden -> dim); hidden = ``attention_dim``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(F.silu(self.w_1(x))))  # [B, T', D]


class ConvModule(nn.Module):
    """Pointwise conv (dim -> 2 dim), GLU, depthwise conv ('same'), BatchNorm, SiLU, pointwise
    conv: ``[B, T', D] -> [B, T', D]``."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"encoder.conv_kernel must be an odd number >= 1, got {kernel_size}")
        self.pointwise_conv1 = nn.Conv1d(dim, 2 * dim, kernel_size=1)
        self.depthwise_conv = nn.Conv1d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2,
                                        groups=dim)
        self.norm = nn.BatchNorm1d(dim)
        self.pointwise_conv2 = nn.Conv1d(dim, dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # [B, D, T']: channels first for Conv1d
        x = F.glu(self.pointwise_conv1(x), dim=1)  # [B, 2D, T'] -> [B, D, T']
        x = F.silu(self.norm(self.depthwise_conv(x)))  # [B, D, T']
        return self.pointwise_conv2(x).transpose(1, 2)  # [B, D, T'] -> [B, T', D]


class ConformerBlock(nn.Module):
    """One pre-norm macaron Conformer block, ``[B, T', D] -> [B, T', D]``::

        x = x + 0.5 * drop(FFN_macaron(LN(x)))
        x = x +       drop(MHSA(LN(x), pos_emb))
        x = x +       drop(Conv(LN(x)))
        x = x + 0.5 * drop(FFN(LN(x)))
        x = LN_final(x)
    """

    def __init__(self, dim: int, n_heads: int, ffn_hidden: int, conv_kernel: int,
                 dropout: float) -> None:
        super().__init__()
        # Attribute order = the original's state_dict order.
        self.self_attn = RelPositionMultiHeadAttention(dim, n_heads)
        self.feed_forward = FeedForward(dim, ffn_hidden, dropout)
        self.feed_forward_macaron = FeedForward(dim, ffn_hidden, dropout)
        self.conv_module = ConvModule(dim, conv_kernel)
        self.norm_ff, self.norm_mha, self.norm_ff_macaron, self.norm_conv, self.norm_final = (
            nn.LayerNorm(dim, eps=LAYER_NORM_EPS) for _ in range(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        x = x + 0.5 * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x)))
        x = x + self.dropout(self.self_attn(self.norm_mha(x), pos_emb))
        x = x + self.dropout(self.conv_module(self.norm_conv(x)))
        x = x + 0.5 * self.dropout(self.feed_forward(self.norm_ff(x)))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    """Subsampling, positional encoding, ``num_blocks`` Conformer blocks, final LayerNorm:
    ``[B, T >= 7, input_dim] -> [B, T', width]`` with T' = :func:`subsampled_length` (T)."""

    def __init__(self, input_dim: int, width: int, num_blocks: int, n_heads: int,
                 ffn_hidden: int, conv_kernel: int, dropout: float) -> None:
        super().__init__()
        self.embed = Conv2dSubsampling4(input_dim, width)
        self.pos_enc = RelPositionalEncoding(width, dropout)  # holds no state_dict entries
        self.after_norm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.encoders = nn.ModuleList(ConformerBlock(width, n_heads, ffn_hidden, conv_kernel,
                                                     dropout) for _ in range(num_blocks))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] < MIN_FRAMES:
            raise FeatureError(f"input has {x.shape[1]} frames; the encoder needs at least "
                               f"{MIN_FRAMES} (after mean_size averaging): pass a longer excerpt")
        x = self.embed(x)  # [B, T', D]
        x, pos_emb = self.pos_enc(x)  # [B, T', D], [1, T', D]
        for block in self.encoders:
            x = block(x, pos_emb)  # [B, T', D]
        return self.after_norm(x)  # [B, T', D]
