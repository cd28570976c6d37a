//! Library and pipeline cache, buffers and dispatch of the Metal kernels on Candle's command
//! encoder. Every kernel reads the parameter struct (set as bytes at index 0) and the
//! per-sequence records (index 1); buffer indices follow `plan.rs` and the kernel signatures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Layout, MetalDevice, MetalError, MetalStorage, Result};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline, Library};
use objc2_metal::MTLSize;

use crate::op::BackwardInputs;
use crate::params::AttnParams;
use crate::plan::metal::{self as plan, Launch, MetalParams};
use crate::plan::metal_source::msl_source;
use crate::plan::{Dt, InputLayout};

/// The compiled library of one device and its pipelines by kernel name.
struct DeviceKernels {
    library: Library,
    pipelines: Mutex<HashMap<String, ComputePipeline>>,
}

type Cache = Mutex<HashMap<candle_core::metal_backend::DeviceId, Arc<DeviceKernels>>>;

fn metal_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Metal(MetalError::Message(e.to_string()))
}

/// The pipeline of kernel `name`, compiling the library on first use on this device (the MSL
/// compiler runs once per process and device, like Candle's own kernels).
fn pipeline(dev: &MetalDevice, name: &str) -> Result<ComputePipeline> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let kernels = {
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .map_err(metal_err)?;
        match cache.get(&dev.id()) {
            Some(k) => k.clone(),
            None => {
                let library = dev
                    .device()
                    .new_library_with_source(&msl_source(), None)
                    .map_err(|e| metal_err(format!("flash_attn: compiling kernels/metal: {e}")))?;
                let k = Arc::new(DeviceKernels {
                    library,
                    pipelines: Mutex::new(HashMap::new()),
                });
                cache.insert(dev.id(), k.clone());
                k
            }
        }
    };
    let mut pipelines = kernels.pipelines.lock().map_err(metal_err)?;
    if let Some(p) = pipelines.get(name) {
        return Ok(p.clone());
    }
    let function = kernels.library.get_function(name, None).map_err(|e| {
        metal_err(format!(
            "flash_attn: no Metal kernel {name} ({e}); bf16 needs a GPU family with `bfloat` (MSL 3.1)"
        ))
    })?;
    let p = dev
        .device()
        .new_compute_pipeline_state_with_function(&function)
        .map_err(metal_err)?;
    // The kernels are written for fixed threadgroups (4 simdgroups): a pipeline whose register
    // use lowers the limit below that cannot run them.
    let need = if name.starts_with("flash_bwd_pre") {
        plan::PRE_ROWS
    } else {
        plan::THREADS as usize
    };
    if p.max_total_threads_per_threadgroup() < need {
        bail!(
            "flash_attn: Metal kernel {name} allows {} threads per threadgroup, needs {need}",
            p.max_total_threads_per_threadgroup()
        )
    }
    pipelines.insert(name.to_string(), p.clone());
    Ok(p)
}

fn dt_of(d: DType) -> Result<Dt> {
    Dt::of(d, "the Metal backend")
}

/// The problem's constant buffers: parameters (bytes), per-sequence records, ALiBi slopes and
/// the block mask's lists (one-element stand-ins when off: every declared buffer is bound).
struct Constants {
    params: MetalParams,
    seq_info: Arc<Buffer>,
    alibi: Arc<Buffer>,
    mask: Arc<Buffer>,
}

fn constants(p: &AttnParams, dev: &MetalDevice, l: [&Layout; 3]) -> Result<Constants> {
    let (q, k, v) = (
        InputLayout::checked("q", l[0], p.head_dim)?,
        InputLayout::checked("k", l[1], p.head_dim)?,
        InputLayout::checked("v", l[2], p.head_dim)?,
    );
    // Refused before anything is dispatched: a block size the kernels cannot tile.
    let (mask_dims, lists) = plan::block_mask(p)?.unwrap_or_default();
    let slopes = p.alibi.clone().unwrap_or_else(|| vec![0.0]);
    let lists = if lists.is_empty() { vec![0] } else { lists };
    Ok(Constants {
        params: MetalParams {
            mask_dims,
            ..plan::params(p, &q, &k, &v)
        },
        seq_info: dev.new_buffer_with_data(&plan::seq_info(p, &q, &k, &v))?,
        alibi: dev.new_buffer_with_data(&slopes)?,
        mask: dev.new_buffer_with_data(&lists)?,
    })
}

/// A buffer binding: read or written, at a byte offset.
#[derive(Clone, Copy)]
enum Bind<'a> {
    In(&'a Buffer, usize),
    Out(&'a Buffer, usize),
}

fn dispatch(
    enc: &ComputeCommandEncoder,
    pipe: &ComputePipeline,
    l: &Launch,
    c: &Constants,
    bufs: &[Bind],
) {
    enc.set_compute_pipeline_state(pipe);
    enc.set_bytes(0, &c.params);
    enc.set_input_buffer(1, Some(&c.seq_info), 0);
    for (i, b) in bufs.iter().enumerate() {
        match *b {
            Bind::In(buf, off) => enc.set_input_buffer(i + 2, Some(buf), off),
            Bind::Out(buf, off) => enc.set_output_buffer(i + 2, Some(buf), off),
        }
    }
    enc.set_threadgroup_memory_length(0, l.smem);
    enc.dispatch_thread_groups(
        MTLSize {
            width: l.grid[0] as usize,
            height: l.grid[1] as usize,
            depth: l.grid[2] as usize,
        },
        MTLSize {
            width: l.threads as usize,
            height: 1,
            depth: 1,
        },
    );
}

/// Forward: returns the output `(total_q, hq, d)` contiguous and the statistics (f32,
/// [`AttnParams::stats_len`]: V2 lse, V1 m ‖ l).
pub fn forward(
    p: &AttnParams,
    (q, lq): (&MetalStorage, &Layout),
    (k, lk): (&MetalStorage, &Layout),
    (v, lv): (&MetalStorage, &Layout),
) -> Result<(MetalStorage, MetalStorage)> {
    let dev = q.device().clone();
    let dtype = q.dtype();
    let dt = dt_of(dtype)?;
    let c = constants(p, &dev, [lq, lk, lv])?;
    let n_out = p.out_len();
    let n_stats = p.stats_len();
    let out = if p.lse_grad {
        // The lse-gradient slot after the output must hold zeros (see `op`).
        dev.allocate_zeros(n_out * dtype.size_in_bytes())?
    } else {
        dev.new_buffer(n_out, dtype, "flash-attn-out")?
    };
    let stats = dev.new_buffer(n_stats, DType::F32, "flash-attn-stats")?;
    let launch = plan::forward_launch(p, dt);
    let pipe = pipeline(&dev, &launch.name)?;
    {
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_label("flash-attn-fwd");
        dispatch(
            enc,
            &pipe,
            &launch,
            &c,
            &[
                Bind::In(&c.alibi, 0),
                Bind::In(q.buffer(), 0),
                Bind::In(k.buffer(), 0),
                Bind::In(v.buffer(), 0),
                Bind::Out(&out, 0),
                Bind::Out(&stats, 0),
                Bind::In(&c.mask, 0),
            ],
        );
    }
    Ok((
        MetalStorage::new(out, dev.clone(), n_out, dtype),
        MetalStorage::new(stats, dev, n_stats, DType::F32),
    ))
}

/// Backward: returns `dq ‖ dk ‖ dv` in one buffer, in the inputs' dtype.
pub fn backward(
    p: &AttnParams,
    (q, lq): (&MetalStorage, &Layout),
    (k, lk): (&MetalStorage, &Layout),
    (v, lv): (&MetalStorage, &Layout),
    inp: BackwardInputs<MetalStorage>,
) -> Result<MetalStorage> {
    let dev = q.device().clone();
    let dtype = q.dtype();
    let dt = dt_of(dtype)?;
    let mut c = constants(p, &dev, [lq, lk, lv])?;
    c.params.has_dlse = inp.dlse.is_some() as i32;
    let n = p.lse_len();
    let (nq, nk) = (p.q_elems(), p.k_elems());
    let total = nq + 2 * nk;
    let lse = dev.new_buffer(n, DType::F32, "flash-attn-lse")?;
    let delta = dev.new_buffer(n, DType::F32, "flash-attn-delta")?;
    // Zeroed: keys past a dense sequence's `key_lengths` entry get no dK/dV kernel write.
    let grads = dev.allocate_zeros(total * dtype.size_in_bytes())?;
    let [pre, dq_l, dkdv_l] = plan::backward_launches(p, dt);
    let pipes = [
        pipeline(&dev, &pre.name)?,
        pipeline(&dev, &dq_l.name)?,
        pipeline(&dev, &dkdv_l.name)?,
    ];
    let es = dt.size();
    let (o, o_off) = (inp.out.0, inp.out.1 * es);
    let (d_o, do_off) = (inp.grad_out.0, inp.grad_out.1 * es);
    let (st, st_off) = (inp.stats.0, inp.stats.1 * 4);
    // Without a gradient the kernel never reads buffer 7: the statistics stand in.
    let (dl, dl_off) = inp.dlse.map_or((st, st_off), |(g, off)| (g, off * 4));
    {
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_label("flash-attn-bwd");
        dispatch(
            enc,
            &pipes[0],
            &pre,
            &c,
            &[
                Bind::In(o.buffer(), o_off),
                Bind::In(d_o.buffer(), do_off),
                Bind::In(st.buffer(), st_off),
                Bind::Out(&lse, 0),
                Bind::Out(&delta, 0),
                Bind::In(dl.buffer(), dl_off),
            ],
        );
        let common = [
            Bind::In(&c.alibi, 0),
            Bind::In(q.buffer(), 0),
            Bind::In(k.buffer(), 0),
            Bind::In(v.buffer(), 0),
            Bind::In(d_o.buffer(), do_off),
            Bind::In(&lse, 0),
            Bind::In(&delta, 0),
        ];
        let mut b = common.to_vec();
        b.extend([Bind::Out(&grads, 0), Bind::In(&c.mask, 0)]);
        dispatch(enc, &pipes[1], &dq_l, &c, &b);
        let mut b = common.to_vec();
        b.extend([
            Bind::Out(&grads, nq * es),
            Bind::Out(&grads, (nq + nk) * es),
            Bind::In(&c.mask, 0),
        ]);
        dispatch(enc, &pipes[2], &dkdv_l, &c, &b);
    }
    Ok(MetalStorage::new(grads, dev, total, dtype))
}
