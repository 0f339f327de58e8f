//! The device: adapter choice, pipelines, buffers, and an encoder that records kernel
//! dispatches (parameters through one uniform arena at dynamic offsets) and reads results back.

use crate::shaders;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wgpu::util::DeviceExt;

/// Why the GPU target could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "no GPU adapter found (backends: {backends}); install a Vulkan driver (e.g. Debian's \
         mesa-vulkan-drivers for the lavapipe software adapter) or set WGPU_BACKEND"
    )]
    NoAdapter { backends: String },
    #[error("no adapter matches {wanted:?}; available: {available}")]
    AdapterNotFound { wanted: String, available: String },
    #[error("could not open the device on {adapter}: {reason}")]
    RequestDevice { adapter: String, reason: String },
    #[error("device error: {0}")]
    Device(String),
}

/// One adapter as `meo devices` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({}, {}", self.index, self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all())
}

/// Adapters in preference order: real GPUs before software ones, Vulkan/Metal/DX12 before GL.
fn adapters(inst: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let mut v = pollster::block_on(inst.enumerate_adapters(backends()));
    let rank = |a: &wgpu::Adapter| {
        let i = a.get_info();
        let ty = match i.device_type {
            wgpu::DeviceType::DiscreteGpu => 0,
            wgpu::DeviceType::IntegratedGpu => 1,
            wgpu::DeviceType::VirtualGpu => 2,
            wgpu::DeviceType::Cpu => 3,
            wgpu::DeviceType::Other => 4,
        };
        (ty, u8::from(i.backend == wgpu::Backend::Gl))
    };
    v.sort_by_key(rank);
    v
}

fn summary(index: usize, a: &wgpu::Adapter) -> AdapterSummary {
    let i = a.get_info();
    AdapterSummary {
        index,
        name: i.name.clone(),
        backend: format!("{:?}", i.backend).to_lowercase(),
        device_type: format!("{:?}", i.device_type),
        driver: format!("{} {}", i.driver, i.driver_info).trim().to_string(),
    }
}

/// The adapters wgpu finds (honouring `WGPU_BACKEND`), in the order `--adapter N` indexes.
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapters(&instance()).iter().enumerate().map(|(i, a)| summary(i, a)).collect()
}

/// A compiled kernel and its bind group layout.
struct Kernel {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

/// Bytes of one kernel's parameters (16 words).
const PARAM_BYTES: u64 = 64;
/// The uniform arena holding the parameters of one submission's dispatches.
const ARENA_BYTES: u64 = 1 << 20;

/// An opened device with every kernel compiled.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The adapter exposes WGSL's `packed_4x8_integer_dot_product` (`dot4I8Packed`).
    pub packed_dot: bool,
    pub max_binding: u64,
    kernels: HashMap<&'static str, Kernel>,
    arena: wgpu::Buffer,
    align: u64,
    dummy: wgpu::Buffer,
    scratch: Mutex<HashMap<&'static str, wgpu::Buffer>>,
    error: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("adapter", &self.info.name).finish_non_exhaustive()
    }
}

const STORAGE: wgpu::BufferUsages =
    wgpu::BufferUsages::STORAGE.union(wgpu::BufferUsages::COPY_SRC).union(wgpu::BufferUsages::COPY_DST);

impl Gpu {
    /// Opens the adapter named by `wanted` (an index into [`list_adapters`], or a
    /// case-insensitive part of its name), or the first one. `portable_dot` compiles the
    /// portable int8 dot product even where `dot4I8Packed` is available.
    ///
    /// # Errors
    /// No adapter, none matching, or the device could not be opened.
    pub fn open(wanted: Option<&str>, portable_dot: bool) -> Result<Self, GpuError> {
        let inst = instance();
        let all = adapters(&inst);
        if all.is_empty() {
            return Err(GpuError::NoAdapter { backends: format!("{:?}", backends()) });
        }
        let adapter = match wanted {
            None => &all[0],
            Some(w) => {
                let by_index = w.parse::<usize>().ok().and_then(|i| all.get(i));
                let lw = w.to_lowercase();
                by_index.or_else(|| all.iter().find(|a| a.get_info().name.to_lowercase().contains(&lw))).ok_or_else(
                    || GpuError::AdapterNotFound {
                        wanted: w.to_string(),
                        available: all
                            .iter()
                            .enumerate()
                            .map(|(i, a)| summary(i, a).to_string())
                            .collect::<Vec<_>>()
                            .join("; "),
                    },
                )?
            }
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("meo"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::RequestDevice { adapter: info.name.clone(), reason: e.to_string() })?;
        let error = Arc::new(Mutex::new(None::<String>));
        let sink = error.clone();
        // Without a handler wgpu panics on a validation error; record it and report it as a
        // typed error at the next synchronisation point instead.
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut g) = sink.lock() {
                g.get_or_insert_with(|| e.to_string());
            }
        }));
        let packed_dot = !portable_dot
            && inst.wgsl_language_features().contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct);
        let mut kernels = HashMap::new();
        for (name, body, ro, rw) in shaders::KERNELS {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(shaders::source(body, packed_dot).into()),
            });
            let mut entries = vec![wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: wgpu::BufferSize::new(PARAM_BYTES),
                },
                count: None,
            }];
            for b in 0..ro + rw {
                entries.push(wgpu::BindGroupLayoutEntry {
                    binding: 1 + b,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Storage { read_only: b < ro },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                });
            }
            let layout = device
                .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(name), entries: &entries });
            let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(name),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: Some(&pl),
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            });
            kernels.insert(name, Kernel { pipeline, layout });
        }
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: ARENA_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let dummy = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dummy"),
            size: 16,
            usage: STORAGE,
            mapped_at_creation: false,
        });
        let gpu = Self {
            align: u64::from(limits.min_uniform_buffer_offset_alignment).max(PARAM_BYTES),
            max_binding: limits.max_storage_buffer_binding_size,
            device,
            queue,
            info,
            packed_dot,
            kernels,
            arena,
            dummy,
            scratch: Mutex::new(HashMap::new()),
            error,
        };
        gpu.check()?;
        Ok(gpu)
    }

    /// The first device error recorded since the last call, if any.
    pub fn check(&self) -> Result<(), GpuError> {
        match self.error.lock().ok().and_then(|mut g| g.take()) {
            Some(e) => Err(GpuError::Device(e)),
            None => Ok(()),
        }
    }

    /// A storage buffer holding `bytes` (padded to a whole number of words), written straight
    /// from `bytes` (for weights: from the mapped file, no intermediate copy).
    pub fn upload(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer, GpuError> {
        let size = (bytes.len() as u64).div_ceil(4).max(1) * 4;
        if size > self.max_binding {
            return Err(GpuError::Device(format!(
                "{label}: {size} bytes exceed the adapter's largest storage binding ({} bytes)",
                self.max_binding
            )));
        }
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: STORAGE,
            mapped_at_creation: true,
        });
        {
            let mut view = buf.get_mapped_range_mut(..).map_err(|e| GpuError::Device(e.to_string()))?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buf.unmap();
        Ok(buf)
    }

    /// A storage buffer holding `values`.
    pub fn upload_f32(&self, label: &str, values: &[f32]) -> Result<wgpu::Buffer, GpuError> {
        self.upload(label, bytemuck::cast_slice(values))
    }

    /// A storage buffer of at least `bytes` bytes (contents undefined), empty of data.
    pub fn buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.div_ceil(4).max(1) * 4,
            usage: STORAGE,
            mapped_at_creation: false,
        })
    }

    /// The scratch buffer `name`, grown to at least `bytes`. Reusing one within a submission
    /// is safe: commands run in the order they were recorded.
    pub fn scratch(&self, name: &'static str, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        if bytes > self.max_binding {
            return Err(GpuError::Device(format!(
                "scratch {name}: {bytes} bytes exceed the adapter's largest storage binding ({} bytes); \
                 feed the prompt in smaller pieces",
                self.max_binding
            )));
        }
        let mut map = self.scratch.lock().map_err(|_| GpuError::Device("scratch lock poisoned".into()))?;
        if let Some(b) = map.get(name)
            && b.size() >= bytes
        {
            return Ok(b.clone());
        }
        let size = bytes.max(4).next_power_of_two().min(self.max_binding.max(bytes));
        let b = self.buffer(name, size);
        map.insert(name, b.clone());
        Ok(b)
    }

    /// A buffer the kernels bind where they read nothing.
    pub fn dummy(&self) -> &wgpu::Buffer {
        &self.dummy
    }

    /// A new recording.
    pub fn encoder(&self) -> Enc<'_> {
        Enc { gpu: self, enc: Some(self.new_encoder()), params: Vec::new() }
    }

    fn new_encoder(&self) -> wgpu::CommandEncoder {
        self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("meo") })
    }
}

/// A recording of dispatches and copies, submitted by [`Enc::read`] or [`Enc::submit`].
pub struct Enc<'g> {
    gpu: &'g Gpu,
    enc: Option<wgpu::CommandEncoder>,
    params: Vec<u8>,
}

/// Groups for `n` invocations of 64 (or `n` workgroups when `per_group`), as a 2-D grid.
fn grid(n: usize, per_group: bool) -> (u32, u32) {
    let groups = if per_group { n } else { n.div_ceil(64) }.max(1);
    const MAX: usize = 32768;
    let x = groups.min(MAX);
    (x as u32, groups.div_ceil(x) as u32)
}

impl Enc<'_> {
    fn enc(&mut self) -> &mut wgpu::CommandEncoder {
        self.enc.get_or_insert_with(|| self.gpu.new_encoder())
    }

    /// Records kernel `name` with `params` (≤ 16 words) over `bufs` (read-only ones first) on
    /// `groups` workgroups.
    pub fn dispatch(&mut self, name: &str, params: &[u32], bufs: &[&wgpu::Buffer], groups: [u32; 3]) {
        let Some(k) = self.gpu.kernels.get(name) else { return };
        if self.params.len() as u64 + self.gpu.align > ARENA_BYTES {
            // The arena is full: run what was recorded (its parameters are written first).
            self.submit();
        }
        let offset = self.params.len();
        self.params.resize(offset + self.gpu.align as usize, 0);
        for (i, w) in params.iter().take(16).enumerate() {
            self.params[offset + 4 * i..][..4].copy_from_slice(&w.to_le_bytes());
        }
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.gpu.arena,
                offset: 0,
                size: wgpu::BufferSize::new(PARAM_BYTES),
            }),
        }];
        for (i, b) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry { binding: 1 + i as u32, resource: b.as_entire_binding() });
        }
        let bg = self.gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &k.layout,
            entries: &entries,
        });
        let enc = self.enc();
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        pass.set_pipeline(&k.pipeline);
        pass.set_bind_group(0, &bg, &[offset as u32]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    /// One invocation per element of `n`.
    pub fn dispatch_1d(&mut self, name: &str, params: &[u32], bufs: &[&wgpu::Buffer], n: usize) {
        let (x, y) = grid(n, false);
        self.dispatch(name, params, bufs, [x, y, 1]);
    }

    /// One workgroup per row of `rows`, times `z`.
    pub fn dispatch_rows(&mut self, name: &str, params: &[u32], bufs: &[&wgpu::Buffer], rows: usize, z: u32) {
        let (x, y) = grid(rows, true);
        self.dispatch(name, params, bufs, [x, y, z]);
    }

    pub fn copy(&mut self, src: &wgpu::Buffer, src_off: u64, dst: &wgpu::Buffer, dst_off: u64, bytes: u64) {
        if bytes > 0 {
            self.enc().copy_buffer_to_buffer(src, src_off, dst, dst_off, bytes);
        }
    }

    pub fn clear(&mut self, buf: &wgpu::Buffer, bytes: u64) {
        self.enc().clear_buffer(buf, 0, Some(bytes.div_ceil(4) * 4));
    }

    /// Submits what was recorded.
    pub fn submit(&mut self) {
        if !self.params.is_empty() {
            self.gpu.queue.write_buffer(&self.gpu.arena, 0, &self.params);
            self.params.clear();
        }
        if let Some(enc) = self.enc.take() {
            self.gpu.queue.submit([enc.finish()]);
        }
    }

    /// Submits, waits, and reads back the first `len` f32 values of each buffer.
    ///
    /// # Errors
    /// The device failed or reported an error.
    pub fn read(&mut self, what: &[(&wgpu::Buffer, usize)]) -> Result<Vec<Vec<f32>>, GpuError> {
        let total: u64 = what.iter().map(|(_, n)| (*n as u64 * 4).max(4)).sum();
        let staging = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut off = 0;
        for (b, n) in what {
            let bytes = *n as u64 * 4;
            self.copy(b, 0, &staging, off, bytes);
            off += bytes.max(4);
        }
        self.submit();
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| GpuError::Device(e.to_string()))?;
        self.gpu.check()?;
        match rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(GpuError::Device(e.to_string())),
            Err(_) => return Err(GpuError::Device("readback was never mapped".into())),
        }
        let view = staging.get_mapped_range(..).map_err(|e| GpuError::Device(e.to_string()))?;
        let mut out = Vec::with_capacity(what.len());
        let mut off = 0usize;
        for (_, n) in what {
            let bytes = &view[off..off + n * 4];
            out.push(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect());
            off += (n * 4).max(4);
        }
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// A buffer holding `data` (fresh, so safe to record many within one submission).
    pub fn data(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let mut v = data.to_vec();
        v.resize(data.len().div_ceil(4).max(1) * 4, 0);
        self.gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &v,
            usage: STORAGE,
        })
    }
}

impl Drop for Enc<'_> {
    fn drop(&mut self) {
        // Anything recorded and not yet submitted still runs (e.g. the KV-cache appends of
        // the last layer before the logits were read).
        self.submit();
    }
}
