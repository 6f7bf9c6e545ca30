// FocusDPO Studio: a token-grid mask drawn over an RGB image (src/app/overlay.rs).
//
// One full-rect triangle; every fragment maps its position in the widget to image uv through the pan/zoom
// transform, reads the image pixel (nearest: the images are small and inspected pixel by pixel), reads the mask
// at the token under it (nearest, or bilinear between token centres when `smooth`), maps the value through a
// colormap and blends it over the image with `opacity`. With `contour`, the border of the M_prior token cells is
// drawn as a white line of constant screen width. Outside the image the fragment is transparent.
//
// Values are sRGB-encoded throughout (image bytes and colormap stops); on an sRGB framebuffer the result is
// converted to linear so that the display is the same on both kinds of target.

struct Uniforms {
    // xy: image uv of the widget's top-left corner; zw: image uv per widget uv (1 / zoom).
    view: vec4<f32>,
    // x: mask opacity in [0, 1]; y: contour width in physical pixels; zw: widget size in physical pixels.
    params: vec4<f32>,
    // xy: mask grid (columns, rows); zw: image size (width, height) in pixels.
    sizes: vec4<f32>,
    // x: colormap (0 viridis, 1 magma, 2 grey); y: smooth; z: contour; w: bit 0 has mask, bit 1 sRGB target.
    flags: vec4<u32>,
};

@group(0) @binding(0) var<uniform> u: Uniforms;
@group(0) @binding(1) var image_tex: texture_2d<f32>;
@group(0) @binding(2) var mask_tex: texture_2d<f32>;
@group(0) @binding(3) var prior_tex: texture_2d<f32>;

struct VsOut {
    @builtin(position) position: vec4<f32>,
    @location(0) uv: vec2<f32>,
};

@vertex
fn vs_main(@builtin(vertex_index) index: u32) -> VsOut {
    // (0,0), (2,0), (0,2): one triangle that covers the viewport (egui sets it to the widget's rect).
    let x = f32((index << 1u) & 2u);
    let y = f32(index & 2u);
    var out: VsOut;
    out.position = vec4<f32>(x * 2.0 - 1.0, 1.0 - y * 2.0, 0.0, 1.0);
    out.uv = vec2<f32>(x, y);
    return out;
}

// 9 evenly spaced stops of matplotlib's colormaps (sRGB), linearly interpolated.
const VIRIDIS = array<vec3<f32>, 9>(
    vec3<f32>(0.267, 0.004, 0.329),
    vec3<f32>(0.278, 0.176, 0.482),
    vec3<f32>(0.231, 0.322, 0.545),
    vec3<f32>(0.173, 0.447, 0.557),
    vec3<f32>(0.129, 0.565, 0.549),
    vec3<f32>(0.153, 0.678, 0.506),
    vec3<f32>(0.365, 0.784, 0.388),
    vec3<f32>(0.667, 0.863, 0.196),
    vec3<f32>(0.992, 0.906, 0.145),
);

const MAGMA = array<vec3<f32>, 9>(
    vec3<f32>(0.000, 0.000, 0.016),
    vec3<f32>(0.114, 0.067, 0.278),
    vec3<f32>(0.318, 0.071, 0.486),
    vec3<f32>(0.510, 0.149, 0.506),
    vec3<f32>(0.714, 0.212, 0.475),
    vec3<f32>(0.902, 0.318, 0.392),
    vec3<f32>(0.984, 0.533, 0.380),
    vec3<f32>(0.996, 0.761, 0.529),
    vec3<f32>(0.988, 0.992, 0.749),
);

fn colormap(value: f32, which: u32) -> vec3<f32> {
    let v = clamp(value, 0.0, 1.0);
    if which == 2u {
        return vec3<f32>(v);
    }
    let x = v * 8.0;
    let i = min(u32(floor(x)), 7u);
    let f = x - f32(i);
    if which == 1u {
        return mix(MAGMA[i], MAGMA[i + 1u], f);
    }
    return mix(VIRIDIS[i], VIRIDIS[i + 1u], f);
}

fn load_cell(tex: texture_2d<f32>, cell: vec2<i32>, grid: vec2<i32>) -> f32 {
    return textureLoad(tex, clamp(cell, vec2<i32>(0), grid - vec2<i32>(1)), 0).r;
}

// Bilinear between token centres (clamped at the border).
fn load_smooth(tex: texture_2d<f32>, grid_pos: vec2<f32>, grid: vec2<i32>) -> f32 {
    let p = grid_pos - vec2<f32>(0.5);
    let base = vec2<i32>(floor(p));
    let f = p - floor(p);
    let a = load_cell(tex, base, grid);
    let b = load_cell(tex, base + vec2<i32>(1, 0), grid);
    let c = load_cell(tex, base + vec2<i32>(0, 1), grid);
    let d = load_cell(tex, base + vec2<i32>(1, 1), grid);
    return mix(mix(a, b, f.x), mix(c, d, f.x), f.y);
}

fn srgb_to_linear(c: vec3<f32>) -> vec3<f32> {
    let low = c / 12.92;
    let high = pow((c + vec3<f32>(0.055)) / 1.055, vec3<f32>(2.4));
    return select(high, low, c <= vec3<f32>(0.04045));
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    let uv = u.view.xy + in.uv * u.view.zw;
    if uv.x < 0.0 || uv.y < 0.0 || uv.x >= 1.0 || uv.y >= 1.0 {
        return vec4<f32>(0.0);
    }
    let image_size = vec2<i32>(u.sizes.zw);
    let pixel = clamp(vec2<i32>(floor(uv * u.sizes.zw)), vec2<i32>(0), image_size - vec2<i32>(1));
    var color = textureLoad(image_tex, pixel, 0).rgb;

    let grid = vec2<i32>(u.sizes.xy);
    let grid_pos = uv * u.sizes.xy;
    let cell = vec2<i32>(floor(grid_pos));
    if (u.flags.w & 1u) != 0u {
        var value: f32;
        if u.flags.y != 0u {
            value = load_smooth(mask_tex, grid_pos, grid);
        } else {
            value = load_cell(mask_tex, cell, grid);
        }
        color = mix(color, colormap(value, u.flags.x), u.params.x);
    }

    if u.flags.z != 0u {
        // Distance to each side of the token cell in physical pixels; a side is on the contour when the prior
        // differs across it.
        let cell_px = u.params.zw / (u.view.zw * u.sizes.xy);
        let f = grid_pos - floor(grid_pos);
        let inside = load_cell(prior_tex, cell, grid) > 0.5;
        let width = u.params.y;
        var edge = false;
        if f.x * cell_px.x < width && (load_cell(prior_tex, cell - vec2<i32>(1, 0), grid) > 0.5) != inside && cell.x > 0 {
            edge = true;
        }
        if (1.0 - f.x) * cell_px.x < width && (load_cell(prior_tex, cell + vec2<i32>(1, 0), grid) > 0.5) != inside
            && cell.x < grid.x - 1 {
            edge = true;
        }
        if f.y * cell_px.y < width && (load_cell(prior_tex, cell - vec2<i32>(0, 1), grid) > 0.5) != inside && cell.y > 0 {
            edge = true;
        }
        if (1.0 - f.y) * cell_px.y < width && (load_cell(prior_tex, cell + vec2<i32>(0, 1), grid) > 0.5) != inside
            && cell.y < grid.y - 1 {
            edge = true;
        }
        // The image border closes contours of subjects that touch it.
        if inside && ((f.x * cell_px.x < width && cell.x == 0) || ((1.0 - f.x) * cell_px.x < width && cell.x == grid.x - 1)
            || (f.y * cell_px.y < width && cell.y == 0) || ((1.0 - f.y) * cell_px.y < width && cell.y == grid.y - 1)) {
            edge = true;
        }
        if edge {
            color = vec3<f32>(1.0);
        }
    }

    if (u.flags.w & 2u) != 0u {
        color = srgb_to_linear(color);
    }
    return vec4<f32>(color, 1.0);
}
