"""`ernielab serve`: an image-generation server (OpenAI-compatible Images API, native API with server-sent
progress, request batching, Prometheus metrics and a web page) around a `TextToImagePipeline`."""
