"""The web studio (`sora-jax studio`): generate, extend, connect and edit in the browser.

`engine` is the studio without a page (requests, uploads, signed results, verdicts);
`app` is its Gradio page and server. Import `app` only where Gradio is installed.
"""
