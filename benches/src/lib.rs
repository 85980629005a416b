//! Shared fixtures for the criterion suites: realistic vLLM frames and the
//! seed's approach to streaming, kept here (not in the sidecar) so nothing
//! in the product is public only for benchmarks.

pub mod routing_report;
pub mod workloads;

use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// `n` chat-completion chunks exactly as vLLM frames them, then `[DONE]`.
pub fn vllm_frames(n: usize) -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(n + 2);
    frames.push(Bytes::from(
        "data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"org/model-7b\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}]}\n\n",
    ));
    for i in 0..n {
        let finish = if i + 1 == n { "\"stop\"" } else { "null" };
        frames.push(Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"org/model-7b\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
        )));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

/// The seed's streaming path, faithfully: every chunk is appended to a
/// mutex-guarded Vec as it passes, and the whole response is hashed at the
/// end (memory grows with the response).
pub struct SeedAccumulator {
    buffer: Mutex<Vec<u8>>,
}

impl Default for SeedAccumulator {
    fn default() -> Self {
        SeedAccumulator {
            buffer: Mutex::new(Vec::new()),
        }
    }
}

impl SeedAccumulator {
    pub fn pass(&self, chunk: &Bytes) -> Bytes {
        self.buffer
            .lock()
            .expect("not poisoned")
            .extend_from_slice(chunk);
        chunk.clone()
    }

    pub fn finish(&self) -> [u8; 32] {
        Sha256::digest(&*self.buffer.lock().expect("not poisoned")).into()
    }
}
