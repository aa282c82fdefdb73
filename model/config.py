"""GPTConfig and the depth dial: depth, aspect ratio and head dim -> every shape of the model."""
import math
from dataclasses import asdict, dataclass

# The defaults of the depth dial (and of train.pretrain's flags of the same names)
ASPECT_RATIO = 64
HEAD_DIM = 128
MAX_SEQ_LEN = 2048
VOCAB_SIZE = 32768  # 2^15, padded up to a multiple of 64 inside the model
WINDOW_PATTERN = "SSSL"


@dataclass
class GPTConfig:
    sequence_len: int = MAX_SEQ_LEN
    vocab_size: int = VOCAB_SIZE
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    window_pattern: str = WINDOW_PATTERN

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """The vocabulary padded up to a multiple of 64 (tensor-core friendly lm_head and embedding)."""
        return -(-self.vocab_size // 64) * 64

    def window_sizes(self) -> list[int]:
        """Per layer: how many previous tokens each query sees (-1 = full context).

        The pattern tiles over layers; L = full, S = half the context rounded up to a multiple of 128;
        the last layer is always L.
        """
        short = -(-(self.sequence_len // 2) // 128) * 128
        sizes = [-1 if self.window_pattern[i % len(self.window_pattern)] == "L" else short
                 for i in range(self.n_layer)]
        sizes[-1] = -1
        return sizes

    def has_value_embedding(self, layer: int) -> bool:
        """Every other layer carries a value embedding, the last one always included."""
        return layer % 2 == (self.n_layer - 1) % 2

    def to_dict(self) -> dict:
        return asdict(self)


def config_from_depth(depth: int, aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM,
                      max_seq_len: int = MAX_SEQ_LEN, vocab_size: int = VOCAB_SIZE,
                      window_pattern: str = WINDOW_PATTERN) -> GPTConfig:
    """model_dim = depth x aspect_ratio rounded UP to a multiple of head_dim;
    n_head = n_kv_head = model_dim / head_dim."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=window_pattern)
