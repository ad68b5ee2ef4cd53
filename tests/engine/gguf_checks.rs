use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_phi::{model, Error};

use crate::common::{config, weights, write_gguf};

fn load_with(overrides: &[(&str, Option<Value>)]) -> Result<model::LoadedModel, Error> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = config();
    write_gguf(&path, &cfg, &weights(&cfg, 1, GgmlDType::Q8_0), overrides);
    model::load(&path)
}

#[test]
fn a_valid_file_loads_with_its_own_hyperparameters() {
    let loaded = load_with(&[("phi3.rope.freq_base", Some(Value::F32(5e5)))]).unwrap();
    let cfg = &loaded.weights.config;
    assert_eq!(cfg.rope_freq_base, 5e5);
    assert_eq!(
        (cfg.vocab_size, cfg.num_layers, cfg.context_length),
        (96, 2, 300)
    );
}

#[test]
fn each_fault_has_its_own_error() {
    match load_with(&[("general.architecture", Some(Value::String("llama".into())))]) {
        Err(Error::WrongArchitecture { found, .. }) => assert_eq!(found, "llama"),
        other => panic!("{:?}", other.err()),
    }
    match load_with(&[("phi3.block_count", None)]) {
        Err(Error::MissingKey { key, .. }) => assert_eq!(key, "phi3.block_count"),
        other => panic!("{:?}", other.err()),
    }
    match load_with(&[("phi3.attention.head_count_kv", Some(Value::U32(3)))]) {
        Err(Error::InvalidKey { key, .. }) => assert_eq!(key, "phi3.attention.head_count_kv"),
        other => panic!("{:?}", other.err()),
    }
    match load_with(&[("phi3.block_count", Some(Value::U32(3)))]) {
        Err(Error::MissingTensor { name, .. }) => assert_eq!(name, "blk.2.attn_norm.weight"),
        other => panic!("{:?}", other.err()),
    }
    match load_with(&[("phi3.feed_forward_length", Some(Value::U32(64)))]) {
        Err(Error::TensorShape { name, .. }) => assert!(name.ends_with("ffn_up.weight"), "{name}"),
        other => panic!("{:?}", other.err()),
    }
    match load_with(&[("phi3.context_length", Some(Value::String("4k".into())))]) {
        Err(Error::InvalidKey { key, .. }) => assert_eq!(key, "phi3.context_length"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn truncation_and_garbage_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = config();
    write_gguf(&path, &cfg, &weights(&cfg, 1, GgmlDType::Q8_0), &[]);
    let bytes = std::fs::read(&path).unwrap();
    for keep in [10, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..keep]).unwrap();
        match model::load(&path) {
            Err(Error::Truncated { .. }) => {}
            other => panic!("keep {keep}: {:?}", other.err()),
        }
    }
    std::fs::write(&path, b"PK\x03\x04zip").unwrap();
    assert!(matches!(model::load(&path), Err(Error::NotGguf { .. })));
    assert!(matches!(
        model::load(&dir.path().join("absent.gguf")),
        Err(Error::ModelNotFound { .. })
    ));
}
