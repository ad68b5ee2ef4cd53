use candle_core::{Device, Tensor};
use candle_phi::sampling::{Sampler, SamplingParams};
use candle_phi::Error;

fn logits() -> Tensor {
    Tensor::new(&[0.1f32, 2.0, -1.0, 1.9, 0.5], &Device::Cpu).unwrap()
}

#[test]
fn greedy_takes_the_argmax_and_the_penalty_applies() {
    let params = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.0,
        ..Default::default()
    };
    let mut sampler = Sampler::new(&params).unwrap();
    assert_eq!(sampler.sample(&logits(), &[]).unwrap(), 1);
    let params = SamplingParams {
        temperature: 0.0,
        repeat_penalty: 1.5,
        ..Default::default()
    };
    let mut sampler = Sampler::new(&params).unwrap();
    assert_eq!(sampler.sample(&logits(), &[1]).unwrap(), 3);
    // Only the last `repeat_last_n` generated tokens are penalised.
    let params = SamplingParams {
        repeat_last_n: 1,
        ..params
    };
    let mut sampler = Sampler::new(&params).unwrap();
    assert_eq!(sampler.sample(&logits(), &[1, 4]).unwrap(), 1);
}

#[test]
fn same_seed_same_samples() {
    let params = SamplingParams {
        seed: Some(9),
        temperature: 2.0,
        top_k: None,
        top_p: None,
        ..Default::default()
    };
    let draw = |params: &SamplingParams| {
        let mut s = Sampler::new(params).unwrap();
        (0..50)
            .map(|_| s.sample(&logits(), &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(&params), draw(&params));
    assert_ne!(
        draw(&params),
        draw(&SamplingParams {
            seed: Some(10),
            ..params.clone()
        })
    );
}

#[test]
fn top_k_one_is_greedy() {
    let params = SamplingParams {
        top_k: Some(1),
        temperature: 5.0,
        repeat_penalty: 1.0,
        ..Default::default()
    };
    let mut s = Sampler::new(&params).unwrap();
    assert!((0..20).all(|_| s.sample(&logits(), &[]).unwrap() == 1));
}

#[test]
fn invalid_settings_are_named() {
    let cases = [
        (
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                temperature: f64::NAN,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: Some(0.0),
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                top_p: Some(1.01),
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            "top_k",
        ),
        (
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            "repeat_penalty",
        ),
    ];
    for (params, name) in cases {
        match Sampler::new(&params) {
            Err(Error::InvalidArgument { name: got, .. }) => assert_eq!(got, name),
            Err(other) => panic!("{name}: wrong error {other}"),
            Ok(_) => panic!("{name}: accepted {params:?}"),
        }
    }
}

/// The default settings take the same path as before min-p, OpenAI penalties and biases
/// existed: Candle's repeat penalty, then its `LogitsProcessor`, draw for draw.
#[test]
fn defaults_sample_as_candles_processor_does() {
    use candle_transformers::generation::{LogitsProcessor, Sampling};
    let params = SamplingParams {
        seed: Some(3),
        temperature: 1.5,
        ..Default::default()
    };
    let mut ours = Sampler::new(&params).unwrap();
    let mut candle = LogitsProcessor::from_sampling(
        3,
        Sampling::TopKThenTopP {
            k: 40,
            p: 0.95,
            temperature: 1.5,
        },
    );
    let logits = Tensor::new(
        &(0..200)
            .map(|i| ((i * 37) % 101) as f32 / 17.0)
            .collect::<Vec<_>>()[..],
        &Device::Cpu,
    )
    .unwrap();
    let mut generated = Vec::new();
    for _ in 0..100 {
        let penalised = candle_transformers::utils::apply_repeat_penalty(
            &logits,
            1.1,
            &generated[generated.len().saturating_sub(64)..],
        )
        .unwrap();
        let expected = candle.sample(&penalised).unwrap();
        assert_eq!(ours.sample(&logits, &generated).unwrap(), expected);
        generated.push(expected);
    }
}
