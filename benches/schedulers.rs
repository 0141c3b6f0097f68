//! A 50-step schedule of every scheduler on flux-dev's model sampling (`cpu_schedule_<name>`).

use criterion::{Criterion, criterion_group, criterion_main};
use flux_schedulers::{ModelSampling, Scheduler, calculate_sigmas};
use std::hint::black_box;

fn schedules(c: &mut Criterion) {
    let model = ModelSampling::flux_dev();
    for scheduler in Scheduler::ALL {
        c.bench_function(&format!("cpu_schedule_{scheduler}"), |b| {
            b.iter(|| calculate_sigmas(black_box(scheduler), black_box(&model), black_box(50)));
        });
    }
}

criterion_group!(benches, schedules);
criterion_main!(benches);
