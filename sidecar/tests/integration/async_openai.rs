//! The `async-openai` crate, a client no one here wrote, against the gateway.

use crate::common::*;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use futures_util::StreamExt;

fn client(gw: &Gateway, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.url))
            .with_api_key(key),
    )
}

fn request(stream: bool) -> async_openai::types::chat::CreateChatCompletionRequest {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model("alias")
        .messages([ChatCompletionRequestUserMessage::from("hello from rust").into()]);
    if stream {
        args.stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    }
    args.build().unwrap()
}

#[tokio::test]
async fn chat_streaming_non_streaming_and_models() {
    let sim = simulator("s0", 6, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let c = client(&gw, KEY);

    let answer = c.chat().create(request(false)).await.unwrap();
    assert_eq!(answer.model, UPSTREAM_MODEL);
    let text = answer.choices[0].message.content.clone().unwrap();
    assert_eq!(text.split_whitespace().count(), 6);
    assert_eq!(answer.usage.unwrap().completion_tokens, 6);

    let mut stream = c.chat().create_stream(request(true)).await.unwrap();
    let mut streamed = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for choice in &chunk.choices {
            streamed.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
        usage = usage.or(chunk.usage);
    }
    assert_eq!(streamed.split_whitespace().count(), 6);
    assert_eq!(usage.unwrap().completion_tokens, 6);

    let models = c.models().list().await.unwrap();
    let ids: Vec<_> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["m", "other"]);
    gw.settle().await;
}

#[tokio::test]
async fn wrong_key_is_an_api_error_not_a_transport_error() {
    let sim = simulator("s0", 1, 0).await;
    let gw = gateway(config(&[&sim.url], "", "")).await;
    let err = client(&gw, "ig-wrong-key-000000000")
        .chat()
        .create(request(false))
        .await
        .unwrap_err();
    match err {
        async_openai::error::OpenAIError::ApiError(e) => {
            assert_eq!(e.status_code.as_u16(), 401);
            assert_eq!(e.api_error.code.as_deref(), Some("invalid_api_key"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}
