//! Classic DCT perceptual hash (pHash): robust to re-encoding, rescaling and mild colour shifts,
//! so near-duplicate photos in the lake land within a few bits of each other.

use std::f64::consts::PI;

use super::VisionError;
use super::quality::Luma;

/// Side of the luma thumbnail the DCT is taken over.
const THUMB: usize = 32;
/// Side of the low-frequency block that becomes the hash (8×8 = 64 bits).
const BLOCK: usize = 8;

/// Number of differing bits; near-duplicates differ by a handful, unrelated photos by ~32.
pub fn hamming(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// Luma shrunk to 32×32, 2-D DCT-II, top-left 8×8 block. The median is taken over the 63 AC
/// coefficients (the DC term only tracks overall brightness and would skew it); bit `i`
/// (row-major over the block, DC included) is set when coefficient `i` exceeds that median.
pub(super) fn phash(luma: &Luma) -> Result<u64, VisionError> {
    let thumb = luma.resized_u8((THUMB as u32, THUMB as u32))?;
    let coeffs = dct_low_block(&thumb);
    let mut ac: Vec<f64> = coeffs[1..].to_vec();
    ac.sort_unstable_by(f64::total_cmp);
    // 63 values: the middle one is the median.
    let median = ac[ac.len() / 2];
    Ok(coeffs.iter().enumerate().fold(
        0u64,
        |hash, (i, &c)| if c > median { hash | (1 << i) } else { hash },
    ))
}

/// The `BLOCK`×`BLOCK` lowest-frequency DCT-II coefficients of a `THUMB`×`THUMB` image,
/// row-major. Only those are needed, so the separable transform computes 8 of 32 outputs per
/// pass. Unnormalised (no orthonormal scale factors), as in the common pHash implementations.
fn dct_low_block(pixels: &[u8]) -> [f64; BLOCK * BLOCK] {
    let mut basis = [[0.0f64; THUMB]; BLOCK];
    for (k, row) in basis.iter_mut().enumerate() {
        for (n, b) in row.iter_mut().enumerate() {
            *b = (PI / THUMB as f64 * (n as f64 + 0.5) * k as f64).cos();
        }
    }
    // Rows first: rowdct[y][u] = Σx p[y][x] · basis[u][x].
    let mut rowdct = [[0.0f64; BLOCK]; THUMB];
    for (y, out) in rowdct.iter_mut().enumerate() {
        let line = &pixels[y * THUMB..(y + 1) * THUMB];
        for (u, o) in out.iter_mut().enumerate() {
            *o = line
                .iter()
                .zip(&basis[u])
                .map(|(&p, &b)| f64::from(p) * b)
                .sum();
        }
    }
    let mut block = [0.0f64; BLOCK * BLOCK];
    for v in 0..BLOCK {
        for u in 0..BLOCK {
            block[v * BLOCK + u] = (0..THUMB).map(|y| rowdct[y][u] * basis[v][y]).sum();
        }
    }
    block
}
