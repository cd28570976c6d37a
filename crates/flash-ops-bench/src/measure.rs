//! Timing: the median of repeated runs after a warm-up, per variant and workload, and the matmul
//! ceiling the GFLOP/s are read against.

use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, Var};
use flash_ops::AttnOptions;

use crate::{peak_extra_on, Variant, Workload};

/// The median of `xs` (the mean of the two middle values for an even count); `None` if empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some(0.5 * (s[n / 2 - 1] + s[n / 2])),
    }
}

/// Wall time of `f` in ms, waiting for the device's queued work before and after.
fn time_ms(dev: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// The median wall time of `reps` runs of `f`, ms.
pub(crate) fn median_ms(
    dev: &Device,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let times = (0..reps)
        .map(|_| time_ms(dev, &mut f))
        .collect::<Result<Vec<_>>>()?;
    match median(&times) {
        Some(t) => Ok(t),
        None => bail!("`reps` must be at least 1, got 0"),
    }
}

/// Timings (median of `reps`, after one warm-up that also measures peak memory) of one variant.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: Workload,
    pub variant: Variant,
    pub fwd_ms: f64,
    /// `None` for forward-only variants.
    pub fwd_bwd_ms: Option<f64>,
    /// Peak bytes above what was live before; `None` where the device has no counter (Metal).
    pub fwd_mem: Option<usize>,
    pub fwd_bwd_mem: Option<usize>,
}

impl Row {
    /// Backward time as forward+backward minus forward (how both papers report it).
    pub fn bwd_ms(&self) -> Option<f64> {
        self.fwd_bwd_ms.map(|t| t - self.fwd_ms)
    }
}

/// Times one variant on `dev` with inputs of `dtype` (the papers' GPU runs: bf16/f16; CPU: f32).
pub fn measure(v: Variant, w: &Workload, reps: usize, dev: &Device, dtype: DType) -> Result<Row> {
    measure_with(v, w, &w.options(), reps, dev, dtype)
}

/// As [`measure`] with `opts` instead of `w.options()` (e.g. a block mask).
pub fn measure_with(
    v: Variant,
    w: &Workload,
    opts: &AttnOptions,
    reps: usize,
    dev: &Device,
    dtype: DType,
) -> Result<Row> {
    if v == Variant::CandleNn && (!dev.is_cpu() || dtype != DType::F32) {
        bail!("candle-nn flash_attn is measured on the CPU in f32 only")
    }
    let attend = |q: &Tensor, k: &Tensor, val: &Tensor| v.forward_with(q, k, val, w, opts);
    let t = time_step(
        &attend,
        v.has_backward().then_some(v.name()),
        w,
        (true, reps),
        dev,
        dtype,
    )?;
    Ok(Row {
        workload: *w,
        variant: v,
        fwd_ms: t.fwd_ms,
        fwd_bwd_ms: t.fwd_bwd_ms,
        fwd_mem: t.fwd_mem,
        fwd_bwd_mem: t.fwd_bwd_mem,
    })
}

/// What [`time_step`] measured of one forward.
struct StepTimes {
    fwd_ms: f64,
    fwd_bwd_ms: Option<f64>,
    fwd_mem: Option<usize>,
    fwd_bwd_mem: Option<usize>,
}

/// Forward alone (detached inputs), and, where `backward` names the forward, the training step
/// around it: forward, the loss `sum(o ∘ dO)` and `backward()` to q, k and v; each the median
/// of `reps`, after one warm-up that also measures peak memory where `warm_up`.
fn time_step(
    forward: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    backward: Option<&str>,
    w: &Workload,
    (warm_up, reps): (bool, usize),
    dev: &Device,
    dtype: DType,
) -> Result<StepTimes> {
    if reps == 0 {
        bail!("measure: `reps` must be at least 1, got 0")
    }
    let input = || Tensor::randn(0f32, 1.0, w.shape(), dev)?.to_dtype(dtype);
    let q = Var::from_tensor(&input()?)?;
    let k = Var::from_tensor(&input()?)?;
    let val = Var::from_tensor(&input()?)?;
    let d_out = input()?;
    let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), val.as_tensor());
    // Forward only: detached inputs, so no graph is kept.
    let (qd, kd, vd) = (qt.detach(), kt.detach(), vt.detach());
    let fwd_once = || forward(&qd, &kd, &vd).map(drop);
    let fwd_mem = match warm_up {
        true => peak_extra_on(dev, fwd_once)?.1,
        false => None,
    };
    let fwd_ms = median_ms(dev, reps, fwd_once)?;
    let (fwd_bwd_ms, fwd_bwd_mem) = match backward {
        Some(name) => {
            let step = || -> Result<()> {
                let o = forward(qt, kt, vt)?;
                let g = (o * &d_out)?.sum_all()?.backward()?;
                if g.get(qt).is_none() || g.get(kt).is_none() || g.get(vt).is_none() {
                    bail!("{name}: a gradient is missing")
                }
                Ok(())
            };
            let mem = match warm_up {
                true => peak_extra_on(dev, step)?.1,
                false => None,
            };
            (Some(median_ms(dev, reps, step)?), mem)
        }
        None => (None, None),
    };
    Ok(StepTimes {
        fwd_ms,
        fwd_bwd_ms,
        fwd_mem,
        fwd_bwd_mem,
    })
}

/// An op that does no attention: its output is a copy of q (what any attention must allocate
/// and write), and it hands the incoming gradient on to q, k and v unchanged (no copy). Timed
/// in [`time_step`]'s step, it leaves what Candle does around an attention op: the loss, the
/// gradient of the output, and the accumulation of each input's gradient (`GradStore`: a zeroed
/// tensor plus an add, per input).
struct PassThrough;

impl CustomOp3 for PassThrough {
    fn name(&self) -> &'static str {
        "pass-through"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // The step's inputs are fresh contiguous tensors: the storage is exactly the tensor.
        if q_layout.contiguous_offsets() != Some((0, q_layout.shape().elem_count())) {
            bail!("pass-through: q must be contiguous from offset 0")
        }
        Ok((q.clone(), q_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.clone()), Some(grad.clone())))
    }
}

/// One round of interleaved timing ([`crate::block_sparse::sweep`]): forward and training step
/// (`(fwd_ms, fwd_bwd_ms)`, NaN for a forward-only variant) of `v` with `opts`, each timed once,
/// after a warm-up where `warm_up`. With `v = None` the op is a pass-through in place of
/// attention: Candle's own share of the step, which subtracted from an attention row leaves the
/// op's own time (forward and backward kernels).
pub fn time_once(
    v: Option<Variant>,
    w: &Workload,
    opts: &AttnOptions,
    warm_up: bool,
    (dev, dtype): (&Device, DType),
) -> Result<(f64, f64)> {
    let attend = |q: &Tensor, k: &Tensor, val: &Tensor| match v {
        Some(v) => v.forward_with(q, k, val, w, opts),
        None => q.apply_op3(k, val, PassThrough),
    };
    let backward = match v {
        Some(v) => v.has_backward().then_some(v.name()),
        None => Some("pass-through"),
    };
    let t = time_step(&attend, backward, w, (warm_up, 1), dev, dtype)?;
    Ok((t.fwd_ms, t.fwd_bwd_ms.unwrap_or(f64::NAN)))
}

/// The matmul size of [`gemm_ceiling`]: large enough to reach the device's matmul peak.
pub fn gemm_ceiling_n(dev: &Device) -> usize {
    if dev.is_cpu() {
        2048
    } else {
        8192
    }
}

/// What a large plain matmul in `dtype` reaches on `dev` now (GFLOP/s, median of `reps` after a
/// warm-up): the roof the tiled kernels aim at.
pub fn gemm_ceiling(reps: usize, dev: &Device, dtype: DType) -> Result<f64> {
    if reps == 0 {
        bail!("gemm_ceiling: `reps` must be at least 1, got 0")
    }
    let n = gemm_ceiling_n(dev);
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let product = || a.matmul(&b).map(drop);
    time_ms(dev, product)?;
    Ok(2.0 * (n as f64).powi(3) / median_ms(dev, reps, product)? / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        // Even counts: the mean of the two middle values, not the upper one.
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn zero_reps_is_an_error_naming_reps() {
        let w = Workload::new(1, 1, 8, 8, false);
        let e = measure(Variant::V2, &w, 0, &Device::Cpu, DType::F32).unwrap_err();
        assert!(e.to_string().contains("`reps`"), "{e}");
        let e = gemm_ceiling(0, &Device::Cpu, DType::F32).unwrap_err();
        assert!(e.to_string().contains("`reps`"), "{e}");
    }

    #[test]
    fn measures_every_in_process_variant_on_a_tiny_workload() -> Result<()> {
        let w = Workload::new(1, 2, 16, 8, true);
        for v in [Variant::V1, Variant::V2, Variant::Naive, Variant::CandleNn] {
            let r = measure(v, &w, 1, &Device::Cpu, DType::F32)?;
            assert!(r.fwd_ms > 0.0, "{v:?}");
            assert_eq!(r.fwd_bwd_ms.is_some(), v.has_backward(), "{v:?}");
        }
        assert!(measure(Variant::TorchSdpa, &w, 1, &Device::Cpu, DType::F32).is_err());
        Ok(())
    }
}
