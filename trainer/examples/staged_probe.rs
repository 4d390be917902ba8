use candle_core::{Device, Tensor};
use candle_nn::Module;
use cohort_spec::train::ModelSpec;
use cohort_trainer::models::Model;
use std::time::Instant;

fn main() {
    let spec = ModelSpec {
        hidden: vec![1024, 1024],
        ..ModelSpec::default()
    };
    let model = Model::new(&spec, (28, 28), 10, &Device::Cpu).unwrap();
    let splits = cohort_trainer::data::synthetic_splits(256, 1, 28, 10, 1).unwrap();
    let idx: Vec<usize> = (0..256).collect();
    let (mut im, mut lb) = (Vec::new(), Vec::new());
    splits.train.gather(&idx, &mut im, &mut lb).unwrap();
    let images = Tensor::from_slice(&im, (256, 784), &Device::Cpu).unwrap();
    let labels = Tensor::from_slice(&lb, 256, &Device::Cpu).unwrap();
    let mut flat = vec![0.0; model.parameters().element_count()];
    let (mut plain, mut staged) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        let t = Instant::now();
        let logits = model.forward(&images).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let g = loss.backward().unwrap();
        model
            .parameters()
            .read_gradients(&g, &mut flat, 1.0)
            .unwrap();
        plain.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let f = model.forward_staged(&images).unwrap();
        let loss = candle_nn::loss::cross_entropy(f.logits(), &labels).unwrap();
        let tf = t.elapsed().as_secs_f64();
        let mut last = Instant::now();
        let mut parts = vec![tf];
        model
            .backward_staged(f, &loss, |r, g| {
                parts.push(last.elapsed().as_secs_f64());
                last = Instant::now();
                for i in r {
                    let p = model.parameters().get(i)?;
                    model
                        .parameters()
                        .read_gradient(i, g, &mut flat[p.flat_range()], 1.0)?;
                }
                Ok(())
            })
            .unwrap();
        staged.push(t.elapsed().as_secs_f64());
        if staged.len() % 10 == 0 {
            println!("{parts:.4?}");
        }
    }
    plain.sort_by(f64::total_cmp);
    staged.sort_by(f64::total_cmp);
    println!("median plain {:.4} staged {:.4}", plain[20], staged[20]);
}
