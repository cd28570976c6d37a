//! The CPU kernels' instruction-set choice and the pieces shared with other CPU code (the fused
//! loss in `flash-ops-models`): tile GEMMs through the `gemm` crate and the `exp` polynomial.
//!
//! **ISA choice.** Made once per process: AVX-512F when the CPU has it, else AVX2+FMA, else a
//! portable scalar path that LLVM may auto-vectorise for the baseline target. The environment
//! variable `FLASH_OPS_CPU_ISA=avx512|avx2|portable` forces a path (tests run every path the
//! machine can run through it); a path the CPU cannot run, or an unknown name, is refused with a
//! [`candle_core::Error`] on the first attention call. `gemm`'s micro-kernels make their own,
//! independent run-time choice.
//!
//! The kernels are written once, generic over [`vector::Simd`] (one vector of `f32` lanes), and
//! instantiated inside `#[target_feature]` functions per ISA, so the intrinsics of `x86.rs`
//! inline into straight vector code.

pub mod gemm;
pub(crate) mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

pub(crate) use vector::Simd;

/// The variable that forces a kernel path.
pub const ISA_VAR: &str = "FLASH_OPS_CPU_ISA";

/// An instruction-set path of the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 16-lane `__m512` (AVX-512F).
    Avx512,
    /// 8-lane `__m256` with fused multiply-add (AVX2+FMA).
    Avx2,
    /// One `f32` at a time, for the baseline target.
    Portable,
}

impl Isa {
    /// Every path, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The name `FLASH_OPS_CPU_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx512 => has!("avx512f"),
                Isa::Avx2 => has!("avx2") && has!("fma"),
                Isa::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }

    /// The fastest path this CPU runs.
    pub fn detected() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Portable)
    }

    /// The path forced by `value` (the variable's content), or why it cannot be.
    fn forced(value: &str) -> std::result::Result<Isa, String> {
        let names = Isa::ALL.map(Isa::name).join(", ");
        let Some(isa) = Isa::ALL.into_iter().find(|i| i.name() == value.trim()) else {
            return Err(format!(
                "flash_attn: {ISA_VAR}={value:?} is not a CPU kernel path; expected one of {names}"
            ));
        };
        if !isa.supported() {
            return Err(format!(
                "flash_attn: {ISA_VAR}={value} asks for a path this CPU cannot run (detected: {})",
                Isa::detected().name()
            ));
        }
        Ok(isa)
    }

    /// The choice, made once: `FLASH_OPS_CPU_ISA` when set, else [`Isa::detected`].
    fn choice() -> &'static std::result::Result<Isa, String> {
        static CHOICE: OnceLock<std::result::Result<Isa, String>> = OnceLock::new();
        CHOICE.get_or_init(|| match std::env::var(ISA_VAR) {
            Ok(v) => Isa::forced(&v),
            Err(std::env::VarError::NotPresent) => Ok(Isa::detected()),
            Err(e) => Err(format!("flash_attn: {ISA_VAR}: {e}")),
        })
    }

    /// The path the kernels take, or the error a bad `FLASH_OPS_CPU_ISA` gives; checked at the
    /// entry of every CPU forward and backward.
    pub fn active() -> candle_core::Result<Isa> {
        Isa::choice()
            .clone()
            .map_err(|e| candle_core::Error::Msg(e).bt())
    }

    /// [`Isa::active`] inside the kernels, after the entry check (portable if that failed, which
    /// it cannot have: the entry returned the error).
    pub(crate) fn current() -> Isa {
        *Isa::choice().as_ref().unwrap_or(&Isa::Portable)
    }

    /// Runs `k` instantiated for this path.
    #[inline(always)]
    pub(crate) fn run<K: Kernel>(self, k: K) -> K::Out {
        match self {
            // SAFETY: a path is only chosen when `supported` (the features are present).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::on_avx512(k) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::on_avx2(k) },
            // SAFETY: `f32` needs no feature.
            _ => unsafe { k.run::<f32>() },
        }
    }
}

/// A kernel written once for every vector type.
pub(crate) trait Kernel {
    type Out;
    /// # Safety
    /// The CPU must have `V`'s features (guaranteed by [`Isa::run`]).
    unsafe fn run<V: Simd>(self) -> Self::Out;
}

/// `exp(x)` to ~2 ulp (see [`vector::exp`]); exactly 0 below `ln(f32::MIN_POSITIVE)`, so a
/// masked (`-inf`) score gives exactly 0. Branch-free, so scalar loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // SAFETY: the `f32` instantiation uses no CPU feature.
    unsafe { vector::exp::<f32>(x) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_names_and_refusals() {
        assert_eq!(Isa::forced("portable"), Ok(Isa::Portable));
        let bad = Isa::forced("sse9").unwrap_err();
        assert!(
            bad.contains(ISA_VAR) && bad.contains("avx512, avx2, portable"),
            "{bad}"
        );
        for isa in Isa::ALL {
            match Isa::forced(isa.name()) {
                Ok(i) => assert!(i == isa && isa.supported()),
                Err(e) => assert!(!isa.supported() && e.contains("cannot run"), "{e}"),
            }
        }
        assert!(Isa::detected().supported());
    }
}
