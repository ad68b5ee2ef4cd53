//! How byte-level BPE tokenizers split text before merging, by the name a GGUF gives in
//! `tokenizer.ggml.pre`: the names llama.cpp's loader knows, each with the regular
//! expressions of its splitting rule. They are applied in order, each to the pieces the one
//! before left, keeping matches and the text between them as pieces (llama.cpp's
//! `unicode_regex_split`; `Split` with `Isolated` in `tokenizers`). The patterns are those
//! llama.cpp runs: case-insensitive groups such as `(?i:'s)` are spelled out, as there.

/// One splitting rule and the `pre` names that use it.
pub struct PreTokenizerRule {
    pub names: &'static [&'static str],
    /// A piece that is one vocabulary entry is taken whole, without merges (Llama 3).
    pub ignore_merges: bool,
    /// A BOS token starts every prompt unless the file says otherwise (Llama 3).
    pub adds_bos: bool,
    pub patterns: &'static [&'static str],
}

/// `pre` names whose splitting llama.cpp does in hand-written code, or without GPT-2's byte
/// mapping: no `tokenizers` pre-tokenizer expresses them.
pub const UNSUPPORTED: &[&str] = &[
    "kimi-k2",
    "afmoe",
    "gemma4",
    "granite-embed-multi-311m",
    "sarvam-moe",
    "whitespace",
];

/// The rule of a `pre` name (no name, or an empty one, is llama.cpp's "default").
pub fn rule(name: Option<&str>) -> Option<&'static PreTokenizerRule> {
    let name = name.filter(|n| !n.is_empty()).unwrap_or("default");
    RULES.iter().find(|rule| rule.names.contains(&name))
}

/// GPT-2's rule, which many others start from or keep.
const GPT2: &str = r#"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"#;
/// Llama 3's rule: numbers in runs of up to three digits.
const LLAMA3: &str = r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#;
/// Llama 3's rule with every digit on its own.
const LLAMA3_SINGLE_DIGITS: &str = r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#;
/// BLOOM's rule (and the models that took it over).
const BLOOM: &str = r#" ?[^(\s|.,!?…。，、।۔،)]+"#;
/// Runs of CJK ideographs and kana.
const CJK_KANA: &str = r#"[一-龥぀-ゟ゠-ヿ]+"#;
/// Every digit on its own.
const DIGIT: &str = r#"\p{N}"#;
/// Digits in runs of up to three.
const DIGITS_1_3: &str = r#"\p{N}{1,3}"#;

#[rustfmt::skip]
pub static RULES: &[PreTokenizerRule] = &[
    // DEFAULT
    PreTokenizerRule {
        names: &["default"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[\p{P}\$\+<=>\^~\|]+"#,
            GPT2,
            r#"\p{N}+"#,
            r#"[0-9][0-9][0-9]"#,
        ],
    },
    // MINICPM5
    PreTokenizerRule {
        names: &["minicpm5"],
        ignore_merges: true,
        adds_bos: false,
        patterns: &[
            DIGITS_1_3,
            r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // LLAMA3
    PreTokenizerRule {
        names: &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"],
        ignore_merges: true,
        adds_bos: true,
        patterns: &[
            LLAMA3,
        ],
    },
    // DEEPSEEK_LLM
    PreTokenizerRule {
        names: &["deepseek-llm"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[\r\n]"#,
            r#"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"#,
            r#"\s?[!-/:-~！-／：-～‘-‟　-。]+"#,
            r#"\s+$"#,
            r#"[一-龥ࠀ-一가-퟿]+"#,
            r#"\p{N}+"#,
        ],
    },
    // DEEPSEEK_CODER
    PreTokenizerRule {
        names: &["deepseek-coder"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[\r\n]"#,
            r#"\s?\p{L}+"#,
            r#"\s?\p{P}+"#,
            r#"[一-龥ࠀ-一가-퟿]+"#,
            DIGIT,
        ],
    },
    // DEEPSEEK3_LLM
    PreTokenizerRule {
        names: &["deepseek-v3"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGITS_1_3,
            CJK_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
    },
    // SPARK2_5
    PreTokenizerRule {
        names: &["spark2_5"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGITS_1_3,
            CJK_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"##,
            DIGIT,
        ],
    },
    // YOUTU
    PreTokenizerRule {
        names: &["youtu"],
        ignore_merges: true,
        adds_bos: false,
        patterns: &[
            r#"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+"#,
            r#"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // FALCON
    PreTokenizerRule {
        names: &["falcon"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[\p{P}\$\+<=>\^~\|`]+"#,
            GPT2,
            r#"[0-9][0-9][0-9]"#,
        ],
    },
    // MPT
    PreTokenizerRule {
        names: &["mpt"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            GPT2,
        ],
    },
    // STARCODER
    PreTokenizerRule {
        names: &["starcoder"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // GPT2
    PreTokenizerRule {
        names: &["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            GPT2,
        ],
    },
    // JAIS2
    PreTokenizerRule {
        names: &["jais-2"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"#,
        ],
    },
    // REFACT
    PreTokenizerRule {
        names: &["refact"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // COMMAND_R
    PreTokenizerRule {
        names: &["command-r"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // QWEN2
    PreTokenizerRule {
        names: &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3_SINGLE_DIGITS,
        ],
    },
    // QWEN35
    PreTokenizerRule {
        names: &["qwen35"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // STABLELM2
    PreTokenizerRule {
        names: &["stablelm2"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3_SINGLE_DIGITS,
        ],
    },
    // OLMO
    PreTokenizerRule {
        names: &["olmo"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            GPT2,
        ],
    },
    // DBRX
    PreTokenizerRule {
        names: &["dbrx"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3,
        ],
    },
    // SMAUG
    PreTokenizerRule {
        names: &["smaug-bpe"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3,
        ],
    },
    // PORO
    PreTokenizerRule {
        names: &["poro-chat"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            BLOOM,
        ],
    },
    // CHATGLM4
    PreTokenizerRule {
        names: &["chatglm-bpe"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3,
        ],
    },
    // CHATGLM4
    PreTokenizerRule {
        names: &["glm4", "glm5"],
        ignore_merges: true,
        adds_bos: false,
        patterns: &[
            LLAMA3,
        ],
    },
    // VIKING
    PreTokenizerRule {
        names: &["viking"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            BLOOM,
            DIGIT,
        ],
    },
    // JAIS
    PreTokenizerRule {
        names: &["jais"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            GPT2,
        ],
    },
    // TEKKEN
    PreTokenizerRule {
        names: &["tekken"],
        ignore_merges: true,
        adds_bos: false,
        patterns: &[
            r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // SMOLLM
    PreTokenizerRule {
        names: &["smollm"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // CODESHELL
    PreTokenizerRule {
        names: &["codeshell"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // BLOOM
    PreTokenizerRule {
        names: &["bloom"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            BLOOM,
        ],
    },
    // GPT3_FINNISH
    PreTokenizerRule {
        names: &["gpt3-finnish"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            BLOOM,
        ],
    },
    // EXAONE
    PreTokenizerRule {
        names: &["exaone"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // EXAONE_MOE
    PreTokenizerRule {
        names: &["exaone-moe"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"#,
        ],
    },
    // CHAMELEON
    PreTokenizerRule {
        names: &["chameleon"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"<sentinel:[0-9]+>"#,
            r#"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z"#,
            r#"([\t\n]|    |  )"#,
            DIGIT,
            r#"[\p{P}!-/:-@\[-`{-~]"#,
            GPT2,
        ],
    },
    // MINERVA
    PreTokenizerRule {
        names: &["minerva-7b"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
    // GPT4O
    PreTokenizerRule {
        names: &["gpt-4o", "llama4", "kanana2", "talkie"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // GRANITE_EMB_MULTI
    PreTokenizerRule {
        names: &["granite-embed-multi-97m"],
        ignore_merges: true,
        adds_bos: false,
        patterns: &[
            r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // TINY_AYA
    PreTokenizerRule {
        names: &["tiny_aya", "cohere2moe"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"\d{1,3}(?=(?:\d{3})*\b)"#,
            r#"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // SUPERBPE
    PreTokenizerRule {
        names: &["superbpe"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"\p{N}+"#,
            r#"(?=(\d{3})+(?!\d))"#,
        ],
    },
    // TRILLION
    PreTokenizerRule {
        names: &["trillion"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            GPT2,
        ],
    },
    // GRANITE_DOCLING
    PreTokenizerRule {
        names: &["granite-docling"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            GPT2,
        ],
    },
    // BAILINGMOE
    PreTokenizerRule {
        names: &["bailingmoe", "bailingmoe2", "llada-moe"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"#,
        ],
    },
    // SEED_CODER
    PreTokenizerRule {
        names: &["seed-coder"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // HUNYUAN
    PreTokenizerRule {
        names: &["hunyuan"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3_SINGLE_DIGITS,
        ],
    },
    // HUNYUAN_DENSE
    PreTokenizerRule {
        names: &["hunyuan-dense"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGITS_1_3,
            CJK_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
    },
    // HY_V4
    PreTokenizerRule {
        names: &["hy_v4"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGITS_1_3,
            CJK_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
    },
    // JOYAI_LLM
    PreTokenizerRule {
        names: &["joyai-llm"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGITS_1_3,
            CJK_KANA,
            r##"[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"##,
        ],
    },
    // UFAKZEKA
    PreTokenizerRule {
        names: &["ufakzeka"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // GROK_2
    PreTokenizerRule {
        names: &["grok-2"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3_SINGLE_DIGITS,
        ],
    },
    // LAGUNA
    PreTokenizerRule {
        names: &["laguna"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[^\n]+|[\n]+"#,
            LLAMA3_SINGLE_DIGITS,
        ],
    },
    // MINIMAX_M2
    PreTokenizerRule {
        names: &["minimax-m2"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            r#"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"#,
        ],
    },
    // SOLAR_OPEN
    PreTokenizerRule {
        names: &["solar-open"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            LLAMA3_SINGLE_DIGITS,
        ],
    },
    // MELLUM2
    PreTokenizerRule {
        names: &["mellum2"],
        ignore_merges: false,
        adds_bos: false,
        patterns: &[
            DIGIT,
            GPT2,
        ],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_compiles_and_every_name_is_listed_once() {
        let mut seen = std::collections::HashSet::new();
        for rule in RULES {
            for name in rule.names {
                assert!(seen.insert(*name), "{name} is listed twice");
                assert!(!UNSUPPORTED.contains(name));
            }
            for pattern in rule.patterns {
                tokenizers::pre_tokenizers::split::Split::new(
                    tokenizers::pre_tokenizers::split::SplitPattern::Regex(pattern.to_string()),
                    tokenizers::SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{pattern}: {e}"));
            }
        }
        for name in [
            "gpt-2",
            "llama-bpe",
            "qwen2",
            "dbrx",
            "gpt-4o",
            "phi-2",
            "default",
        ] {
            assert!(rule(Some(name)).is_some(), "{name}");
        }
        assert_eq!(rule(None).unwrap().names, &["default"]);
        assert!(rule(Some("kimi-k2")).is_none());
    }
}
