from typing_extensions import Buffer

def ef_decode(
    bits: Buffer, low: Buffer, nlow: int, k: int, length: int, out: Buffer, /
) -> None: ...
def scatter_add(
    target: Buffer,
    idx: Buffer,
    vals: Buffer,
    scale: float,
    qscale: float = 1.0,
    checked: bool = False,
    /,
) -> None: ...
def has_int8_min(buf: Buffer, /) -> bool: ...
