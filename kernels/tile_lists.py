"""The kept tiles of one vocabulary chunk, as lists that chunk_matmul.py reads to skip dropped tiles.

Input: keep [R, C] int8, R row tiles x C vocabulary tiles of the chunk's logit gradient dR_c (1 = the
tile has a dense part above filter_eps or a sparse term; written by `_dense_grad_kernel`, OWNER_CHUNK):

    by_row[r, 0 .. count_row[r])  = the c with keep[r, c] = 1, ascending     (dH += dR_c W_c sums over c)
    by_col[c, 0 .. count_col[c])  = the r with keep[r, c] = 1, ascending     (dW_c = dR_c^T H sums over r)

Grid: (R + C,). Program p < R compacts row p, program R + c column c: an inclusive prefix sum over
MAX >= max(R, C) entries gives each kept index its slot. Ascending lists, no atomics: the products that
read them add in a fixed order.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_lists_kernel(keep_ptr, by_row_ptr, count_row_ptr, by_col_ptr, count_col_ptr, R, C, MAX: tl.constexpr):
    p = tl.program_id(0)
    idx = tl.arange(0, MAX)
    if p < R:
        kept = tl.load(keep_ptr + p * C + idx, mask=idx < C, other=0).to(tl.int32)
        tl.store(by_row_ptr + p * C + tl.cumsum(kept, axis=0) - 1, idx, mask=kept > 0)
        tl.store(count_row_ptr + p, tl.sum(kept, axis=0))
    else:
        c = p - R
        kept = tl.load(keep_ptr + idx * C + c, mask=idx < R, other=0).to(tl.int32)
        tl.store(by_col_ptr + c * R + tl.cumsum(kept, axis=0) - 1, idx, mask=kept > 0)
        tl.store(count_col_ptr + c, tl.sum(kept, axis=0))
