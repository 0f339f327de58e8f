//! Hugging Face checkpoint directories: which family a `config.json` describes, the
//! canonical [`ModelConfig`] it gives, and where each canonical tensor's values live in the
//! safetensors files (a whole tensor, or one expert's rows of a fused 3-D tensor).
//!
//! A family is data (one [`Family`] table per file), not branches in the code.

pub mod checkpoint;
pub mod config;
mod deepseek_v2;
mod deepseek_v3;
pub mod meo_gpt2;
mod mixtral;
mod olmoe;
mod qwen2_moe;
mod qwen3_moe;
pub mod switch_transformers;

use crate::canonical::{Canon, Place};
use anyhow::{Context, Result, bail, ensure};
use checkpoint::Checkpoint;
use meo::{FfnKind, ModelConfig, QkNorm};
use std::collections::BTreeSet;
use std::path::Path;

/// A boolean setting of a family.
#[derive(Debug, Clone, Copy)]
pub enum Flag {
    /// Always this value.
    Fixed(bool),
    /// `config.json` key, with the value when absent or null.
    Key(&'static str, bool),
    /// `config.json` key that must be false or absent (true is an unsupported variant).
    MustBeFalse(&'static str),
}

/// Which layers use sliding-window attention.
#[derive(Debug, Clone, Copy)]
pub enum Window {
    /// Never.
    None,
    /// Every layer uses `sliding_window` when it is set (and `enabled_by` is true, if named).
    AllLayers { enabled_by: Option<&'static str> },
    /// Per `layer_types` (or transformers' rule for it), when `use_sliding_window`.
    LayerTypes,
}

/// Everything that distinguishes one supported checkpoint family.
#[derive(Debug)]
pub struct Family {
    /// `general.architecture` of the output, and transformers' `model_type`.
    pub name: &'static str,
    /// The transformers class in `architectures`.
    pub hf_class: &'static str,
    /// `rope_theta` when the config names none (transformers' `default_theta`).
    pub default_rope_theta: f32,
    /// Names of the MoE block under `model.layers.L.`, tried in order.
    pub moe_prefixes: &'static [&'static str],
    /// Per-expert layout: HF names of the gate, up and down projections
    /// (`<moe>.experts.N.<name>.weight`).
    pub expert_names: [&'static str; 3],
    /// `config.json` key of the routed experts' intermediate size.
    pub expert_intermediate_key: &'static str,
    /// Dense MLP layers via `mlp_only_layers` / `decoder_sparse_step`.
    pub dense_layers: bool,
    /// Shared expert with a sigmoid gate (`shared_expert_intermediate_size`).
    pub shared_expert: bool,
    pub qk_norm: QkNorm,
    /// q/k/v biases.
    pub attention_bias: Flag,
    /// Honours `clip_qkv`.
    pub clip_qkv: bool,
    pub window: Window,
    pub norm_topk_prob: Flag,
    /// Family-specific canonical layer suffix → HF name under `model.layers.L.`
    /// (`{moe}` stands for the layer's MoE prefix); looked up before [`COMMON`].
    pub tensors: &'static [(&'static str, &'static str)],
    /// Which layout the rest of the table describes.
    pub kind: Kind,
}

/// The overall layout of a family's checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Llama-style decoder with standard token-routed MoE layers (the fields above).
    Standard,
    /// An MEO-native GPT-2 ([`meo_gpt2`]): its own config keys and tensor names.
    MeoNative,
    /// A Switch Transformers encoder ([`switch_transformers`]): its own config keys and
    /// tensor names.
    Switch,
    /// A DeepSeek-style decoder ([`deepseek_v3`]): MLA attention, its own config keys;
    /// tensors named through the table above like [`Kind::Standard`].
    DeepSeek,
}

/// Every supported family.
pub const FAMILIES: &[&Family] = &[
    &mixtral::FAMILY,
    &qwen2_moe::FAMILY,
    &qwen3_moe::FAMILY,
    &olmoe::FAMILY,
    &meo_gpt2::FAMILY,
    &switch_transformers::FAMILY,
    &switch_transformers::FAMILY_MODEL,
    &switch_transformers::FAMILY_GENERATION,
    &deepseek_v3::FAMILY,
    &deepseek_v2::FAMILY,
];

/// Tensors outside the layers: canonical name → HF name.
const GLOBAL: &[(&str, &str)] = &[
    (meo::names::EMBED, "model.embed_tokens.weight"),
    (meo::names::OUTPUT_NORM, "model.norm.weight"),
    (meo::names::OUTPUT, "lm_head.weight"),
];

/// Layer tensors named alike in every family: canonical suffix → HF suffix.
const COMMON: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.q.weight", "self_attn.q_proj.weight"),
    ("attn.k.weight", "self_attn.k_proj.weight"),
    ("attn.v.weight", "self_attn.v_proj.weight"),
    ("attn.o.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("router.weight", "{moe}.gate.weight"),
];

/// Checkpoint tensors that carry no weights (recomputed buffers some exporters save).
const IGNORED_SUFFIXES: &[&str] = &[".rotary_emb.inv_freq"];

/// Where a canonical tensor's values are: `count` elements of `tensor` from element `first`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub tensor: String,
    pub first: u64,
    pub count: u64,
}

/// How one MoE layer stores its experts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Experts {
    /// `<prefix>.experts.N.<name>.weight`, one tensor per expert and projection.
    PerExpert { prefix: String },
    /// `<prefix>.experts.gate_up_proj [E, 2I, H]` (gate rows first) and
    /// `<prefix>.experts.down_proj [E, H, I]`.
    Fused { prefix: String },
}

impl Experts {
    fn prefix(&self) -> &str {
        match self {
            Self::PerExpert { prefix } | Self::Fused { prefix } => prefix,
        }
    }
}

/// An opened checkpoint directory.
pub struct HfModel {
    pub family: &'static Family,
    pub config: ModelConfig,
    pub checkpoint: Checkpoint,
    /// `tokenizer.json`, verbatim.
    pub tokenizer: Option<String>,
    /// Per layer: the expert layout (MoE layers only).
    experts: Vec<Option<Experts>>,
    /// MEO-native models: the task names (task-gate merges are precomputed for each).
    pub tasks: Vec<String>,
    /// Checkpoint layers past the decoder's that are known to be unused (DeepSeek-V3's
    /// multi-token-prediction modules): their tensors are not reported as unused.
    pub extra_layers: std::ops::Range<usize>,
}

fn read_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", path.display()))
}

impl HfModel {
    /// Reads `config.json`, the safetensors headers and `tokenizer.json` of `dir`.
    ///
    /// # Errors
    /// Unsupported family, bad config, corrupt or missing weights, or a layer whose experts
    /// are in neither known layout.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let raw = read_json(&cfg_path)?;
        let j = config::Json(&raw);
        let family = config::detect(&j).with_context(|| cfg_path.display().to_string())?;
        let gen_path = dir.join("generation_config.json");
        let gen_eos = if gen_path.is_file() {
            let g = read_json(&gen_path)?;
            config::Json(&g).usizes("eos_token_id").with_context(|| gen_path.display().to_string())?
        } else {
            Vec::new()
        };
        let mut extra_layers = 0..0;
        let (config, tasks) = match family.kind {
            Kind::Standard => {
                (config::model_config(&j, family, gen_eos.into_iter().map(|x| x as u64).collect()), vec![])
            }
            Kind::MeoNative => match meo_gpt2::model_config(&j) {
                Ok((c, t)) => (Ok(c), t),
                Err(e) => (Err(e), vec![]),
            },
            Kind::Switch => (switch_transformers::model_config(&j), vec![]),
            Kind::DeepSeek => {
                extra_layers = deepseek_v3::mtp_layers(&j).with_context(|| cfg_path.display().to_string())?;
                let eos = gen_eos.into_iter().map(|x| x as u64).collect();
                let variant = if family.name == deepseek_v2::FAMILY.name { &deepseek_v2::V2 } else { &deepseek_v3::V3 };
                (deepseek_v3::model_config(&j, family, variant, eos).map(|(c, _)| c), vec![])
            }
        };
        let config = config.with_context(|| cfg_path.display().to_string())?;
        let checkpoint = Checkpoint::open(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.is_file() {
            Some(std::fs::read_to_string(&tok_path).with_context(|| format!("{}: cannot read", tok_path.display()))?)
        } else {
            None
        };
        let mut m = Self { family, config, checkpoint, tokenizer, experts: Vec::new(), tasks, extra_layers };
        m.experts = (0..m.config.num_layers)
            .map(|l| {
                (m.config.layer_ffn[l] == FfnKind::Moe && family.kind != Kind::Switch)
                    .then(|| m.detect_experts(l))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(m)
    }

    /// Finds the MoE prefix and expert layout of layer `l` from the tensor names.
    fn detect_experts(&self, l: usize) -> Result<Experts> {
        let ck = &self.checkpoint;
        let (e, h, i) = (
            self.config.router.num_experts as u64,
            self.config.hidden_size as u64,
            self.config.expert_intermediate_size as u64,
        );
        let mut tried = Vec::new();
        for p in self.family.moe_prefixes {
            let prefix = format!("model.layers.{l}.{p}");
            let gate_up = format!("{prefix}.experts.gate_up_proj");
            if let Some(t) = ck.get(&gate_up) {
                let down = format!("{prefix}.experts.down_proj");
                let d = ck.get(&down).with_context(|| format!("checkpoint has {gate_up} but no {down}"))?;
                ensure!(t.shape == [e, 2 * i, h], "{gate_up}: shape {:?}, expected {:?}", t.shape, [e, 2 * i, h]);
                ensure!(d.shape == [e, h, i], "{down}: shape {:?}, expected {:?}", d.shape, [e, h, i]);
                return Ok(Experts::Fused { prefix });
            }
            let first = format!("{prefix}.experts.0.{}.weight", self.family.expert_names[0]);
            if ck.get(&first).is_some() {
                return Ok(Experts::PerExpert { prefix });
            }
            tried.push(gate_up);
            tried.push(first);
        }
        bail!("layer {l}: no experts found in the checkpoint (looked for {})", tried.join(", "))
    }

    /// The checkpoint name for layer tensor `suffix` of layer `l`.
    fn layer_name(&self, l: usize, suffix: &str) -> Result<String> {
        let hf =
            self.family.tensors.iter().chain(COMMON).find(|(c, _)| *c == suffix).map(|&(_, hf)| hf).with_context(
                || format!("the {} family has no source for layer tensor {suffix:?}", self.family.name),
            )?;
        let hf = if hf.contains("{moe}") {
            let moe = self.experts[l].as_ref().with_context(|| format!("layer {l}: {suffix} in a dense layer"))?;
            let short = moe.prefix().rsplit_once('.').map_or(moe.prefix(), |(_, p)| p);
            hf.replace("{moe}", short)
        } else {
            hf.to_string()
        };
        Ok(format!("model.layers.{l}.{hf}"))
    }

    /// Where the values of canonical tensor `c` are, checking shapes against the checkpoint.
    ///
    /// # Errors
    /// The tensor is missing or has the wrong shape.
    pub fn source(&self, c: &Canon) -> Result<Source> {
        let numel: u64 = c.shape.iter().product();
        if self.family.kind == Kind::MeoNative {
            return match meo_gpt2::to_source(c, &self.config)? {
                Some(src) => {
                    let e = self.checkpoint.get(&src.tensor).with_context(|| {
                        format!("checkpoint has no tensor {:?} (needed for {})", src.tensor, c.name)
                    })?;
                    ensure!(
                        src.first + src.count <= e.numel() && (src.first > 0 || e.numel() % numel == 0),
                        "{}: shape {:?} does not hold {} (shape {:?})",
                        src.tensor,
                        e.shape,
                        c.name,
                        c.shape
                    );
                    Ok(src)
                }
                // Computed (task merge): marks the bank's experts as used, reads nothing.
                None => {
                    let Place::TaskBank { layer, bank, part, .. } = c.place else { bail!("no source for {}", c.name) };
                    let part = meo::names::BANK_EXPERT_PARTS[part];
                    Ok(Source {
                        tensor: format!("h.{layer}.mlp.{}.experts.{part}", meo::names::MEO_BANKS[bank]),
                        first: 0,
                        count: 0,
                    })
                }
            };
        }
        let whole = |name: String| -> Result<Source> {
            let e = self
                .checkpoint
                .get(&name)
                .with_context(|| format!("checkpoint has no tensor {name:?} (needed for {})", c.name))?;
            ensure!(e.shape == c.shape, "{name}: shape {:?}, expected {:?} (for {})", e.shape, c.shape, c.name);
            Ok(Source { tensor: name, first: 0, count: numel })
        };
        if self.family.kind == Kind::Switch {
            return whole(switch_transformers::source_name(c, &|n| self.checkpoint.get(n).is_some())?);
        }
        match c.place {
            Place::Global => {
                let hf = GLOBAL.iter().find(|(n, _)| *n == c.name).map(|&(_, hf)| hf);
                whole(hf.with_context(|| format!("no source for {}", c.name))?.to_string())
            }
            Place::Layer { layer, suffix } => whole(self.layer_name(layer, suffix)?),
            Place::BankExpert { .. } | Place::TaskBank { .. } => bail!("{}: not an MEO-native family", c.name),
            Place::Expert { layer, expert, part } => match self.experts[layer].as_ref() {
                Some(Experts::PerExpert { prefix }) => {
                    whole(format!("{prefix}.experts.{expert}.{}.weight", self.family.expert_names[part]))
                }
                Some(Experts::Fused { prefix }) => {
                    // gate_up_proj[e] is [2I, H]: rows [0, I) gate, [I, 2I) up (transformers
                    // concatenates w1 then w3, and chunks gate, up in that order).
                    // down_proj[e] is [H, I].
                    let (tensor, first) = match part {
                        0 | 1 => ("gate_up_proj", (2 * expert as u64 + part as u64) * numel),
                        _ => ("down_proj", expert as u64 * numel),
                    };
                    Ok(Source { tensor: format!("{prefix}.experts.{tensor}"), first, count: numel })
                }
                None => bail!("layer {layer} has no experts"),
            },
        }
    }

    /// Checkpoint tensors that none of `used` reads and that are not known to be ignorable.
    pub fn unused<'a>(&'a self, used: &BTreeSet<&str>) -> Vec<&'a str> {
        let consumed = meo_gpt2::consumed(&self.config, &self.tasks);
        self.checkpoint
            .names()
            .filter(|n| !used.contains(n))
            .filter(|n| !IGNORED_SUFFIXES.iter().any(|s| n.ends_with(s)))
            .filter(|n| !(self.config.tie_word_embeddings && *n == "lm_head.weight"))
            .filter(|n| !consumed.iter().any(|c| c == n))
            .filter(|n| !(self.family.kind == Kind::Switch && switch_transformers::not_converted(n)))
            .filter(|n| !self.extra_layers.clone().any(|l| n.starts_with(&format!("model.layers.{l}."))))
            .collect()
    }
}
