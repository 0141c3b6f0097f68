//! The diffusers names of the autoencoder (`vae/diffusion_pytorch_model.safetensors`, the
//! `AutoencoderKL` module) mapped onto the names of the reference `ae.safetensors`, which the
//! loader in [`crate::vae`] reads.
//!
//! The two files hold the same tensors with the same values; they differ in three ways:
//! * names: `down_blocks.N.resnets.M` for `down.N.block.M`, `conv_shortcut` for
//!   `nin_shortcut`, `mid_block.resnets.{0,1}` for `mid.block_{1,2}`,
//!   `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` for
//!   `mid.attn_1.{norm,q,k,v,proj_out}` (older files: `query`, `key`, `value`, `proj_attn`),
//!   `conv_norm_out` for `norm_out`, `downsamplers.0` / `upsamplers.0` for
//!   `downsample` / `upsample`;
//! * the decoder's levels are numbered the other way round: diffusers' `up_blocks.0` is the
//!   first level run (the deepest), the reference's `up.0` the last, so with `L` levels
//!   `up_blocks.i` is `up.{L-1-i}`;
//! * the attention projections are linear layers `[C, C]` where the reference has 1x1
//!   convolutions `[C, C, 1, 1]`: the same bytes, read with the other shape.
//!
//! The Flux autoencoder has no `quant_conv` / `post_quant_conv` (diffusers'
//! `use_quant_conv: false`); a file holding them is another model and is refused.

use crate::weights::{WeightError, Weights};

/// Whether `w` uses the diffusers names (probed on the first encoder block and the decoder).
pub fn is_diffusers(w: &Weights) -> bool {
    w.names().iter().any(|n| {
        n.starts_with("encoder.down_blocks.")
            || n.starts_with("decoder.up_blocks.")
            || n.starts_with("encoder.mid_block.")
            || n.starts_with("decoder.mid_block.")
    })
}

/// Number of decoder levels of a diffusers file (`decoder.up_blocks.N.` present for N < levels).
fn up_levels(w: &Weights) -> usize {
    let names = w.names();
    let mut n = 0;
    while names
        .iter()
        .any(|k| k.starts_with(&format!("decoder.up_blocks.{n}.")))
    {
        n += 1;
    }
    n
}

/// A mapped name and whether it is an attention projection stored as a linear weight.
struct Mapped {
    name: String,
    linear_attn: bool,
}

/// The reference name of the diffusers tensor `name` in a decoder of `levels` levels; `None`
/// for names that are not part of the autoencoder.
pub fn to_reference_name(name: &str, levels: usize) -> Option<String> {
    map_name(name, levels).map(|m| m.name)
}

fn map_name(name: &str, levels: usize) -> Option<Mapped> {
    let (side, rest) = name.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    // The parameter kind (`weight`, `bias`) is always the last part.
    let (path, param) = rest.rsplit_once('.')?;
    let parts: Vec<&str> = path.split('.').collect();
    let plain = |s: String| {
        Some(Mapped {
            name: format!("{side}.{s}.{param}"),
            linear_attn: false,
        })
    };
    match parts.as_slice() {
        ["conv_in" | "conv_out"] => plain(path.to_string()),
        ["conv_norm_out"] => plain("norm_out".into()),
        ["down_blocks", i, "resnets", j, layer] if side == "encoder" => {
            plain(format!("down.{i}.block.{j}.{}", resnet_layer(layer)?))
        }
        ["down_blocks", i, "downsamplers", "0", "conv"] if side == "encoder" => {
            plain(format!("down.{i}.downsample.conv"))
        }
        ["up_blocks", i, "resnets", j, layer] if side == "decoder" => {
            let l = reversed(i, levels)?;
            plain(format!("up.{l}.block.{j}.{}", resnet_layer(layer)?))
        }
        ["up_blocks", i, "upsamplers", "0", "conv"] if side == "decoder" => {
            plain(format!("up.{}.upsample.conv", reversed(i, levels)?))
        }
        ["mid_block", "resnets", r, layer] => {
            let block = match *r {
                "0" => "block_1",
                "1" => "block_2",
                _ => return None,
            };
            plain(format!("mid.{block}.{}", resnet_layer(layer)?))
        }
        ["mid_block", "attentions", "0", rest @ ..] => {
            let (target, linear) = match rest {
                ["group_norm"] => ("norm", false),
                ["to_q" | "query"] => ("q", true),
                ["to_k" | "key"] => ("k", true),
                ["to_v" | "value"] => ("v", true),
                ["to_out", "0"] | ["proj_attn"] => ("proj_out", true),
                _ => return None,
            };
            Some(Mapped {
                name: format!("{side}.mid.attn_1.{target}.{param}"),
                linear_attn: linear && param == "weight",
            })
        }
        _ => None,
    }
}

fn resnet_layer(layer: &str) -> Option<&'static str> {
    Some(match layer {
        "norm1" => "norm1",
        "conv1" => "conv1",
        "norm2" => "norm2",
        "conv2" => "conv2",
        "conv_shortcut" => "nin_shortcut",
        _ => return None,
    })
}

fn reversed(i: &str, levels: usize) -> Option<usize> {
    let i: usize = i.parse().ok()?;
    levels.checked_sub(1)?.checked_sub(i)
}

/// `w` under the reference names when it uses the diffusers names (attention projections read
/// as 1x1 convolutions); otherwise `w` unchanged.
pub fn normalize_layout(w: &Weights) -> Result<Weights, WeightError> {
    if !is_diffusers(w) {
        return Ok(w.clone());
    }
    if let Some(q) = w
        .names()
        .into_iter()
        .find(|n| n.starts_with("quant_conv.") || n.starts_with("post_quant_conv."))
    {
        return Err(WeightError::Config(format!(
            "autoencoder tensor {q}: the Flux autoencoder has no quant_conv/post_quant_conv \
             (diffusers `use_quant_conv: false`); this file is another autoencoder"
        )));
    }
    let levels = up_levels(w);
    let mut plan = Vec::new();
    let mut reshape = Vec::new();
    for n in w.names() {
        let Some(m) = map_name(n, levels) else {
            continue;
        };
        if m.linear_attn
            && let Some([o, i]) = w.shape(n).map(<[usize]>::to_vec).as_deref()
        {
            reshape.push((m.name.clone(), vec![*o, *i, 1, 1]));
        }
        plan.push((m.name, vec![n.to_string()], false));
    }
    w.remap(&plan)?.reshaped(&reshape)
}

#[cfg(test)]
mod tests {
    use super::to_reference_name;

    /// Pairs taken from the released Flux.1 autoencoder in both layouts (4 levels).
    #[test]
    fn names_of_the_released_flux_autoencoder() {
        let pairs = [
            ("encoder.conv_in.weight", "encoder.conv_in.weight"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
                "encoder.down.2.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm2.weight",
                "encoder.mid.block_2.norm2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.group_norm.bias",
                "encoder.mid.attn_1.norm.bias",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                "encoder.mid.attn_1.proj_out.weight",
            ),
            (
                "decoder.mid_block.attentions.0.to_k.bias",
                "decoder.mid.attn_1.k.bias",
            ),
            ("encoder.conv_norm_out.weight", "encoder.norm_out.weight"),
            (
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                "decoder.up.3.block.2.conv1.weight",
            ),
            (
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
                "decoder.up.3.upsample.conv.weight",
            ),
            (
                "decoder.up_blocks.3.resnets.0.conv_shortcut.bias",
                "decoder.up.0.block.0.nin_shortcut.bias",
            ),
            ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
            ("decoder.conv_out.weight", "decoder.conv_out.weight"),
            (
                "decoder.mid_block.attentions.0.proj_attn.weight",
                "decoder.mid.attn_1.proj_out.weight",
            ),
        ];
        for (d, r) in pairs {
            assert_eq!(to_reference_name(d, 4).as_deref(), Some(r), "{d}");
        }
    }

    #[test]
    fn names_outside_the_autoencoder_are_not_mapped() {
        for n in [
            "quant_conv.weight",
            "decoder.up_blocks.4.resnets.0.conv1.weight",
            "encoder.up_blocks.0.resnets.0.conv1.weight",
            "encoder.mid_block.attentions.0.to_x.weight",
            "encoder.mid_block.resnets.2.conv1.weight",
        ] {
            assert_eq!(to_reference_name(n, 4), None, "{n}");
        }
    }
}
