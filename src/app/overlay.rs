//! The mask overlay: an image and a token-grid mask drawn by `shaders/mask_overlay.wgsl` through an
//! [`egui_wgpu::CallbackTrait`].
//!
//! As in egui's `custom3d_wgpu` demo, the GPU objects (pipeline, per-view textures, uniform buffers, bind groups)
//! are created once and live in the renderer's `callback_resources`; each frame an [`OverlayCallback`] carries only
//! what is needed to draw: the view's key, shared handles to its pixel data (uploaded again only when the handle
//! changes) and the uniforms.

use eframe::{egui, egui_wgpu};
use std::collections::HashMap;
use std::sync::Arc;

use eframe::egui_wgpu::wgpu;

use super::state::{Colormap, ViewSettings};

/// RGBA8 pixels (sRGB) of an image to draw under a mask.
#[derive(Debug, PartialEq)]
pub struct RgbaPixels {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width × height × 4` bytes, row-major.
    pub rgba: Vec<u8>,
}

impl RgbaPixels {
    /// Converts an RGB image.
    pub fn from_rgb(image: &image::RgbImage) -> Self {
        let (width, height) = image.dimensions();
        let rgba = image.pixels().flat_map(|p| [p[0], p[1], p[2], 255]).collect();
        Self { width, height, rgba }
    }
}

/// Values of a token-grid map, row-major (`cols × rows`).
#[derive(Debug, PartialEq)]
pub struct MaskValues {
    /// Columns (tokens per row).
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// Values, expected in `[0, 1]`.
    pub values: Vec<f32>,
}

impl MaskValues {
    /// Copies a [`crate::masks::Grid`].
    pub fn from_grid(grid: &crate::masks::Grid) -> Self {
        Self {
            cols: grid.width() as u32,
            rows: grid.height() as u32,
            values: grid.as_slice().to_vec(),
        }
    }
}

/// One frame's draw of one overlay view.
pub struct OverlayCallback {
    /// Which view (each view keeps its own textures and bind group).
    pub view: egui::Id,
    /// The image.
    pub image: Arc<RgbaPixels>,
    /// The mask drawn in colour (none: the image alone).
    pub mask: Option<Arc<MaskValues>>,
    /// The `M_prior` whose token border is drawn when `contour` is set.
    pub prior: Option<Arc<MaskValues>>,
    /// Colormap, opacity, upsampling, contour.
    pub settings: ViewSettings,
    /// Image uv of the widget's top-left corner and uv per widget uv (pan/zoom).
    pub uv_origin: [f32; 2],
    /// Image uv per widget uv (`1 / zoom`).
    pub uv_per_widget: [f32; 2],
    /// The widget's size in points (sets the contour width in pixels).
    pub widget_size_points: [f32; 2],
}

/// Creates the pipeline and stores it in the renderer's callback resources. Call once, at app creation.
pub fn register(render_state: &egui_wgpu::RenderState) {
    let resources = OverlayResources::new(&render_state.device, render_state.target_format);
    render_state.renderer.write().callback_resources.insert(resources);
}

/// Whether [`register`] ran for this renderer.
pub fn is_registered(render_state: &egui_wgpu::RenderState) -> bool {
    render_state
        .renderer
        .read()
        .callback_resources
        .get::<OverlayResources>()
        .is_some()
}

struct ViewGpu {
    image: Arc<RgbaPixels>,
    mask: Option<Arc<MaskValues>>,
    prior: Option<Arc<MaskValues>>,
    uniforms: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

/// The pipeline and every view's GPU objects.
struct OverlayResources {
    pipeline: wgpu::RenderPipeline,
    layout: wgpu::BindGroupLayout,
    srgb_target: bool,
    views: HashMap<egui::Id, ViewGpu>,
}

const UNIFORM_BYTES: u64 = 64;

fn texture_entry(binding: u32, filterable: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::FRAGMENT,
        ty: wgpu::BindingType::Texture {
            multisampled: false,
            sample_type: wgpu::TextureSampleType::Float { filterable },
            view_dimension: wgpu::TextureViewDimension::D2,
        },
        count: None,
    }
}

impl OverlayResources {
    fn new(device: &wgpu::Device, target: wgpu::TextureFormat) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("mask_overlay"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../shaders/mask_overlay.wgsl").into()),
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("mask_overlay"),
            entries: &[
                wgpu::BindGroupLayoutEntry {
                    binding: 0,
                    visibility: wgpu::ShaderStages::VERTEX | wgpu::ShaderStages::FRAGMENT,
                    ty: wgpu::BindingType::Buffer {
                        ty: wgpu::BufferBindingType::Uniform,
                        has_dynamic_offset: false,
                        min_binding_size: wgpu::BufferSize::new(UNIFORM_BYTES),
                    },
                    count: None,
                },
                texture_entry(1, true),
                // R32Float is not filterable everywhere: the shader reads masks with textureLoad.
                texture_entry(2, false),
                texture_entry(3, false),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("mask_overlay"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_render_pipeline(&wgpu::RenderPipelineDescriptor {
            label: Some("mask_overlay"),
            layout: Some(&pipeline_layout),
            vertex: wgpu::VertexState {
                module: &module,
                entry_point: Some("vs_main"),
                buffers: &[],
                compilation_options: wgpu::PipelineCompilationOptions::default(),
            },
            primitive: wgpu::PrimitiveState::default(),
            depth_stencil: None,
            multisample: wgpu::MultisampleState::default(),
            fragment: Some(wgpu::FragmentState {
                module: &module,
                entry_point: Some("fs_main"),
                targets: &[Some(wgpu::ColorTargetState {
                    format: target,
                    // egui's framebuffer holds premultiplied colour; outside the image the shader writes 0.
                    blend: Some(wgpu::BlendState::PREMULTIPLIED_ALPHA_BLENDING),
                    write_mask: wgpu::ColorWrites::ALL,
                })],
                compilation_options: wgpu::PipelineCompilationOptions::default(),
            }),
            multiview_mask: None,
            cache: None,
        });
        Self {
            pipeline,
            layout,
            srgb_target: target.is_srgb(),
            views: HashMap::new(),
        }
    }

    fn view(&mut self, device: &wgpu::Device, queue: &wgpu::Queue, cb: &OverlayCallback) -> &ViewGpu {
        let stale = self.views.get(&cb.view).is_none_or(|v| {
            !Arc::ptr_eq(&v.image, &cb.image)
                || !same_mask(v.mask.as_ref(), cb.mask.as_ref())
                || !same_mask(v.prior.as_ref(), cb.prior.as_ref())
        });
        if stale {
            let view = self.create_view(device, queue, cb);
            self.views.insert(cb.view, view);
        }
        &self.views[&cb.view]
    }

    fn create_view(&self, device: &wgpu::Device, queue: &wgpu::Queue, cb: &OverlayCallback) -> ViewGpu {
        let image = upload(
            device,
            queue,
            "overlay_image",
            wgpu::TextureFormat::Rgba8Unorm,
            (cb.image.width, cb.image.height),
            &cb.image.rgba,
            4,
        );
        let mask_texture = |label: &str, mask: Option<&Arc<MaskValues>>| match mask {
            Some(m) => upload(
                device,
                queue,
                label,
                wgpu::TextureFormat::R32Float,
                (m.cols, m.rows),
                &f32_bytes(&m.values),
                4,
            ),
            None => upload(
                device,
                queue,
                label,
                wgpu::TextureFormat::R32Float,
                (1, 1),
                &f32_bytes(&[0.0]),
                4,
            ),
        };
        let mask = mask_texture("overlay_mask", cb.mask.as_ref());
        let prior = mask_texture("overlay_prior", cb.prior.as_ref());
        let uniforms = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("overlay_uniforms"),
            size: UNIFORM_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let views = [&image, &mask, &prior].map(|t| t.create_view(&wgpu::TextureViewDescriptor::default()));
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("mask_overlay"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: uniforms.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: wgpu::BindingResource::TextureView(&views[0]),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: wgpu::BindingResource::TextureView(&views[1]),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: wgpu::BindingResource::TextureView(&views[2]),
                },
            ],
        });
        ViewGpu {
            image: Arc::clone(&cb.image),
            mask: cb.mask.clone(),
            prior: cb.prior.clone(),
            uniforms,
            bind_group,
        }
    }
}

fn same_mask(a: Option<&Arc<MaskValues>>, b: Option<&Arc<MaskValues>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn upload(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    format: wgpu::TextureFormat,
    (width, height): (u32, u32),
    bytes: &[u8],
    bytes_per_texel: u32,
) -> wgpu::Texture {
    let size = wgpu::Extent3d {
        width: width.max(1),
        height: height.max(1),
        depth_or_array_layers: 1,
    };
    let texture = device.create_texture(&wgpu::TextureDescriptor {
        label: Some(label),
        size,
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
        view_formats: &[],
    });
    let expected = (size.width * size.height * bytes_per_texel) as usize;
    // A mis-sized buffer (never produced by this module) is drawn as zeros rather than crashing the renderer.
    let owned;
    let data = if bytes.len() == expected {
        bytes
    } else {
        owned = vec![0u8; expected];
        &owned
    };
    queue.write_texture(
        wgpu::TexelCopyTextureInfo {
            texture: &texture,
            mip_level: 0,
            origin: wgpu::Origin3d::ZERO,
            aspect: wgpu::TextureAspect::All,
        },
        data,
        wgpu::TexelCopyBufferLayout {
            offset: 0,
            bytes_per_row: Some(size.width * bytes_per_texel),
            rows_per_image: Some(size.height),
        },
        size,
    );
    texture
}

impl OverlayCallback {
    fn uniform_bytes(&self, size_px: [f32; 2], srgb_target: bool) -> Vec<u8> {
        let s = &self.settings;
        let (cols, rows) = self
            .mask
            .as_ref()
            .or(self.prior.as_ref())
            .map_or((1.0, 1.0), |m| (m.cols as f32, m.rows as f32));
        let floats = [
            self.uv_origin[0],
            self.uv_origin[1],
            self.uv_per_widget[0],
            self.uv_per_widget[1],
            s.opacity.clamp(0.0, 1.0),
            CONTOUR_WIDTH_PX,
            size_px[0],
            size_px[1],
            cols,
            rows,
            self.image.width as f32,
            self.image.height as f32,
        ];
        let colormap = match s.colormap {
            Colormap::Viridis => 0u32,
            Colormap::Magma => 1,
            Colormap::Grey => 2,
        };
        let flags = [
            colormap,
            u32::from(s.smooth),
            u32::from(s.contour && self.prior.is_some()),
            u32::from(self.mask.is_some()) | (u32::from(srgb_target) << 1),
        ];
        let mut bytes: Vec<u8> = floats.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.extend(flags.iter().flat_map(|v| v.to_le_bytes()));
        bytes
    }
}

/// Width of the `M_prior` contour line, in physical pixels.
const CONTOUR_WIDTH_PX: f32 = 1.5;

impl egui_wgpu::CallbackTrait for OverlayCallback {
    fn prepare(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        screen: &egui_wgpu::ScreenDescriptor,
        _encoder: &mut wgpu::CommandEncoder,
        resources: &mut egui_wgpu::CallbackResources,
    ) -> Vec<wgpu::CommandBuffer> {
        let Some(res) = resources.get_mut::<OverlayResources>() else {
            return Vec::new();
        };
        let srgb = res.srgb_target;
        let view = res.view(device, queue, self);
        // The widget's size in physical pixels sets the contour width; the rect itself comes from `paint`'s
        // viewport, so only the size is needed here.
        let size_px = self.size_px(screen.pixels_per_point);
        queue.write_buffer(&view.uniforms, 0, &self.uniform_bytes(size_px, srgb));
        Vec::new()
    }

    fn paint(
        &self,
        _info: egui::PaintCallbackInfo,
        render_pass: &mut wgpu::RenderPass<'static>,
        resources: &egui_wgpu::CallbackResources,
    ) {
        let Some(res) = resources.get::<OverlayResources>() else {
            return;
        };
        let Some(view) = res.views.get(&self.view) else {
            return;
        };
        render_pass.set_pipeline(&res.pipeline);
        render_pass.set_bind_group(0, &view.bind_group, &[]);
        render_pass.draw(0..3, 0..1);
    }
}

impl OverlayCallback {
    fn size_px(&self, pixels_per_point: f32) -> [f32; 2] {
        [
            self.widget_size_points[0] * pixels_per_point,
            self.widget_size_points[1] * pixels_per_point,
        ]
    }
}
