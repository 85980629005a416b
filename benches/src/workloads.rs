//! The routing benchmark's workloads (`src/bin/routing.rs`), generated from
//! one seed so every strategy replays the same requests. Words are tokens to
//! the simulator.

use serde_json::{json, Value};

/// xorshift64*: the same numbers for the same seed, everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn exp_ms(&mut self, mean_ms: f64) -> u64 {
        (-mean_ms * self.unit().ln()) as u64
    }
    pub fn words(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| format!("w{} ", self.below(50_000)))
            .collect()
    }
}

/// What the simulator answers with `n` tokens, as the next turn's history.
pub fn answer(n: usize) -> String {
    (0..n).map(|i| format!("tok{i} ")).collect()
}

/// One user's requests, sent one after the other.
pub struct Session {
    pub start_ms: u64,
    /// (body, think time before it, output tokens)
    pub turns: Vec<(Value, u64)>,
    /// Entry sidecar per turn, drawn from the session's own seed.
    pub entry: Vec<usize>,
}

pub fn body(user: &str, messages: &[Value], tokens: usize) -> Value {
    json!({"model": "m", "messages": messages, "stream": true, "max_tokens": tokens, "user": user})
}

pub fn multi_turn(rng: &mut Rng, system: &str) -> Vec<Session> {
    (0..40)
        .map(|u| {
            let user = format!("user-{u}");
            let mut messages = vec![
                json!({"role": "system", "content": system}),
                json!({"role": "user", "content": format!("Context: {}", rng.words(400))}),
            ];
            let mut turns = Vec::new();
            for t in 0..6 {
                let think = if t == 0 { 0 } else { rng.exp_ms(500.0) };
                turns.push((body(&user, &messages, 64), think));
                messages.push(json!({"role": "assistant", "content": answer(64)}));
                messages.push(json!({"role": "user", "content": rng.words(40)}));
            }
            Session {
                start_ms: rng.below(4_000),
                entry: Vec::new(),
                turns,
            }
        })
        .collect()
}

pub fn documents(rng: &mut Rng) -> Vec<Session> {
    let docs: Vec<String> = (0..12).map(|_| rng.words(3_000)).collect();
    let mut at = 0;
    (0..200)
        .map(|q| {
            at += rng.exp_ms(1000.0 / 30.0);
            let doc = &docs[rng.below(docs.len() as u64) as usize];
            let user = format!("reader-{q}");
            let messages = [
                json!({"role": "system", "content": "Answer from the document only."}),
                json!({"role": "user", "content": format!("Document:\n{doc}\n\nQuestion: {}", rng.words(30))}),
            ];
            Session {
                start_ms: at,
                turns: vec![(body(&user, &messages, 32), 0)],
                entry: Vec::new(),
            }
        })
        .collect()
}

pub fn skewed(rng: &mut Rng, system: &str) -> Vec<Session> {
    let tenant = rng.words(4_000);
    let mut at = 0;
    (0..360)
        .map(|i| {
            at += rng.exp_ms(1000.0 / 60.0);
            let (user, messages) = if rng.below(2) == 0 {
                (
                    format!("hot-{}", rng.below(8)),
                    [
                        json!({"role": "system", "content": tenant}),
                        json!({"role": "user", "content": rng.words(30)}),
                    ],
                )
            } else {
                (
                    format!("user-{i}"),
                    [
                        json!({"role": "system", "content": system}),
                        json!({"role": "user", "content": rng.words(200)}),
                    ],
                )
            };
            Session {
                start_ms: at,
                turns: vec![(body(&user, &messages, 96), 0)],
                entry: Vec::new(),
            }
        })
        .collect()
}
