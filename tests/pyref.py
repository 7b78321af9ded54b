"""Independent references written with Python integers and float64 math.

They share no code with forgetscore: Philox4x32-10 as published (Salmon et al.,
SC 2011) and Box-Muller in double precision.
"""
import math
import struct

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85


def philox(counter, key, rounds=10):
    c = list(counter)
    k0, k1 = key
    for r in range(rounds):
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
             ((p0 >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
        k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
    return c


def row_bits(seed, sample_id, draw_id, numel):
    key = (seed & 0xFFFFFFFF, seed >> 32)
    out = []
    for j in range((numel + 3) // 4):
        out += philox((j, draw_id, sample_id & 0xFFFFFFFF, sample_id >> 32), key)
    return out[:numel]


def to_float32(v):
    """The float32 value nearest to `v` (ties to even)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def row_normals(seed, sample_id, draw_id, numel):
    bits = row_bits(seed, sample_id, draw_id, (numel + 3) // 4 * 4)
    # The uniforms are float32 numbers by definition (above 0.5 the half step rounds): near u = 1, where
    # r = sqrt(-2 log u) is steep, that rounding moves r by up to a few percent, so it is reproduced here.
    u = [to_float32(((x >> 8) + 0.5) / 2 ** 24) for x in bits]
    out = []
    for i in range(0, len(u), 2):
        r = math.sqrt(-2.0 * math.log(u[i]))
        out += [r * math.cos(2 * math.pi * u[i + 1]), r * math.sin(2 * math.pi * u[i + 1])]
    return out[:numel]
