//! The element types linattn computes in.

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point type linattn computes in: `f32` or `f64`.
///
/// Kernels are written once over this trait; `f64` is also the precision of the
/// reference implementations.
pub trait Element:
    sealed::Sealed
    + num_traits::Float
    + num_traits::FloatConst
    + rustfft::FftNum
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::ops::DivAssign
    + Default
    + Send
    + Sync
    + std::fmt::Debug
    + std::fmt::Display
    + 'static
{
    /// NumPy's name for the type (`"float32"`, `"float64"`).
    const NAME: &'static str;
    /// Converts from f64, rounding to the nearest representable value.
    fn of_f64(x: f64) -> Self;
    /// Converts to f64 exactly.
    fn as_f64(self) -> f64;
    /// eˣ by range reduction and a polynomial, branch-free so that loops over it
    /// vectorise: within 3 ulp, 0 below the smallest normal result.
    fn fast_exp(self) -> Self;
}

impl Element for f32 {
    const NAME: &'static str = "float32";
    fn of_f64(x: f64) -> Self {
        x as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        // eˣ = 2ⁿ·eʳ with n = round(x / ln 2), |r| ≤ ln 2 / 2; adding 1.5·2²³ rounds to
        // an integer held in the low mantissa bits.
        const ROUND: f32 = 12_582_912.0;
        const LOWEST: f32 = -87.3;
        let x = self.clamp(LOWEST, 88.7);
        let z = x * std::f32::consts::LOG2_E + ROUND;
        let n = z - ROUND;
        let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (0.166_666_7
                        + r * (0.041_666_49 + r * (0.008_333_452 + r * 0.001_388_2)))));
        let power =
            f32::from_bits(((z.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23) as u32);
        if self < LOWEST { 0.0 } else { power * p }
    }
}

impl Element for f64 {
    const NAME: &'static str = "float64";
    fn of_f64(x: f64) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn fast_exp(self) -> Self {
        const ROUND: f64 = 6_755_399_441_055_744.0; // 1.5·2⁵²
        const LOWEST: f64 = -708.0;
        let x = self.clamp(LOWEST, 709.0);
        let z = x * std::f64::consts::LOG2_E + ROUND;
        let n = z - ROUND;
        let r = x - n * 6.931_471_803_691_238e-1 - n * 1.908_214_929_270_587_7e-10;
        // Taylor to r¹³/13!: the remainder is below 2e-16 for |r| ≤ ln 2 / 2.
        let mut p = 1.0 / 6_227_020_800.0;
        for factorial in [
            479_001_600.0,
            39_916_800.0,
            3_628_800.0,
            362_880.0,
            40_320.0,
            5_040.0,
            720.0,
            120.0,
            24.0,
            6.0,
            2.0,
            1.0,
            1.0,
        ] {
            p = p * r + 1.0 / factorial;
        }
        let power =
            f64::from_bits(((z.to_bits() as i64 - ROUND.to_bits() as i64 + 1023) << 52) as u64);
        if self < LOWEST { 0.0 } else { power * p }
    }
}
