//! The tile sizes and block shapes the kernels and their launches share, in one place:
//! defined here and prepended to every kernel source as `constexpr`s ([`prelude`]), so
//! the host's grid and shared-memory arithmetic and the device code cannot disagree.

/// Rows of every tile the mma kernels stage: a chunk of the causal linear form, a tile of
/// queries or keys of the exact one (`CHUNK`).
pub(super) const CHUNK: usize = 64;
/// Padding of 16-bit shared-memory rows, in elements: rows 16 bytes apart in bank order
/// instead of all starting in the same bank (`PAD`).
pub(super) const PAD: usize = 8;
/// Warps of the causal tensor-core kernel that load, map and score chunks for the
/// `D / 16` warps that own the state (`PRODUCER_WARPS`).
pub(super) const CAUSAL_PRODUCER_WARPS: usize = 8;
/// Query heads one decode block serves at a time (`DECODE_HEADS`).
pub(super) const DECODE_HEADS: usize = 4;
/// The tensor-core exact kernel: query rows per block, keys per tile, threads (four warps
/// of 16 rows) (`flash::ROWS`, `flash::KEYS`, `flash::THREADS`).
pub(super) const FLASH_ROWS: usize = 64;
pub(super) const FLASH_KEYS: usize = 64;
pub(super) const FLASH_THREADS: u32 = 128;
/// The general exact kernel: query rows per block, keys per tile, threads (four a row),
/// and the widest head dim (each thread holds a quarter of a row) (`general::ROWS`,
/// `KEYS`, `THREADS`, `COLUMNS` = the widest dim / 4).
pub(super) const GENERAL_EXACT_ROWS: usize = 32;
pub(super) const GENERAL_EXACT_KEYS: usize = 32;
pub(super) const GENERAL_EXACT_THREADS: u32 = 128;
pub(super) const GENERAL_EXACT_MAX_DIM: usize = 256;
/// The gated family's tensor-core kernels: value columns per scan block (a warp's 16 each)
/// and threads of either kernel (`gated_mma::COLUMNS`, `gated_mma::THREADS`). Four warps
/// of 16 columns cover a d_v = 64 head in one block and split a 128-wide one in two, which
/// doubles the blocks of a long sequence for the cost of its scores computed twice.
pub(super) const GATED_COLUMNS: usize = 64;
pub(super) const GATED_MMA_THREADS: u32 = 128;
/// The most random features the FAVOR+ kernels hold, 8 a lane (`MAX_FEATURES`).
pub(super) const PERFORMER_MAX_FEATURES: usize = 256;

/// The constants above as CUDA C++, to go before every kernel source, each in the
/// namespace its kernels read it from.
pub(super) fn prelude() -> String {
    format!(
        "// Generated from backend/cuda/tiles.rs: the one definition of each.\n\
         namespace linattn {{\n\
         constexpr int CHUNK = {CHUNK};\n\
         constexpr int PAD = {PAD};\n\
         constexpr int DECODE_HEADS = {DECODE_HEADS};\n\
         namespace mma {{\n\
         constexpr int PRODUCER_WARPS = {CAUSAL_PRODUCER_WARPS};\n\
         }}\n\
         namespace gated_mma {{\n\
         constexpr int COLUMNS = {GATED_COLUMNS}, THREADS = {GATED_MMA_THREADS};\n\
         }}\n\
         namespace performer {{\n\
         constexpr int MAX_FEATURES = {PERFORMER_MAX_FEATURES};\n\
         }}\n\
         namespace flash {{\n\
         constexpr int ROWS = {FLASH_ROWS}, KEYS = {FLASH_KEYS}, THREADS = {FLASH_THREADS};\n\
         namespace general {{\n\
         constexpr int ROWS = {GENERAL_EXACT_ROWS}, KEYS = {GENERAL_EXACT_KEYS}, \
         THREADS = {GENERAL_EXACT_THREADS}, COLUMNS = {GENERAL_EXACT_MAX_DIM} / 4;\n\
         }}\n\
         }}\n\
         }}\n"
    )
}
