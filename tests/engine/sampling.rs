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

/// Logits that differ only in their last bits (the same prompt computed in other chunks,
/// as prefix reuse does) give the same tokens for the same seed.
#[test]
fn last_bit_differences_do_not_change_seeded_draws() {
    let base: Vec<f32> = (0..5000)
        .map(|i| ((i * 7919) % 1000) as f32 / 150.0)
        .collect();
    let nudged: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, &v)| v * (1.0 + if i % 3 == 0 { 2e-7 } else { -2e-7 }))
        .collect();
    let tensor = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
    for (top_k, top_p) in [
        (Some(40), Some(0.95)),
        (None, Some(0.9)),
        (Some(200), None),
        (None, None),
    ] {
        let params = SamplingParams {
            temperature: 1.3,
            top_k,
            top_p,
            repeat_penalty: 1.0,
            ..Default::default()
        };
        for seed in 0..100 {
            let params = SamplingParams {
                seed: Some(seed),
                ..params.clone()
            };
            let draw = |logits: &Tensor| {
                let mut sampler = Sampler::new(&params).unwrap();
                (0..10)
                    .map(|_| sampler.sample(logits, &[]).unwrap())
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                draw(&tensor(&base)),
                draw(&tensor(&nudged)),
                "{top_k:?} {top_p:?}"
            );
        }
    }
}

/// The draws follow softmax(logits / temperature), restricted by top-k and top-p.
#[test]
fn draws_follow_the_filtered_distribution() {
    let logits = [1.0f32, 2.0, 0.5, 2.5, -1.0, 0.0];
    let temperature = 0.7;
    let probs = |keep: &[usize]| -> Vec<f64> {
        let w: Vec<f64> = (0..logits.len())
            .map(|i| match keep.contains(&i) {
                true => (f64::from(logits[i]) / temperature).exp(),
                false => 0.0,
            })
            .collect();
        let total: f64 = w.iter().sum();
        w.iter().map(|x| x / total).collect()
    };
    // Sorted: 3 (2.5), 1 (2.0), 0 (1.0), 2 (0.5), 5 (0.0), 4 (-1.0).
    let cases = [
        (None, None, probs(&[0, 1, 2, 3, 4, 5])),
        (Some(3), None, probs(&[3, 1, 0])),
        // At T = 0.7 the two best hold ~0.88 of the mass: top-p 0.8 keeps them.
        (None, Some(0.8), probs(&[3, 1])),
        (Some(1), Some(0.5), probs(&[3])),
    ];
    for (top_k, top_p, expected) in cases {
        let mut sampler = Sampler::new(&SamplingParams {
            temperature,
            top_k,
            top_p,
            repeat_penalty: 1.0,
            seed: Some(7),
            ..Default::default()
        })
        .unwrap();
        let tensor = Tensor::new(&logits[..], &Device::Cpu).unwrap();
        let n = 40_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[sampler.sample(&tensor, &[]).unwrap() as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let seen = c as f64 / n as f64;
            assert!(
                (seen - expected[i]).abs() < 0.01,
                "{top_k:?} {top_p:?}: token {i} drawn {seen:.3}, expected {:.3}",
                expected[i]
            );
        }
    }
}

#[test]
fn greedy_ties_go_to_the_lowest_id_and_banning_everything_is_an_error() {
    let tied = Tensor::new(&[1.0f32, 3.0, 3.0, 2.0], &Device::Cpu).unwrap();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    assert_eq!(
        Sampler::new(&greedy).unwrap().sample(&tied, &[]).unwrap(),
        1
    );
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            temperature,
            logit_bias: (0..4).map(|i| (i, -100.0)).collect(),
            ..Default::default()
        };
        let err = Sampler::new(&params)
            .unwrap()
            .sample(&tied, &[])
            .unwrap_err();
        assert!(err.to_string().contains("no token is left"), "{err}");
    }
}
