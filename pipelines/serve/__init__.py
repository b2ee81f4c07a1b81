"""The MoVA Ray Serve application: an OpenAI-compatible ingress, an adapter deployment, an LLM
deployment and one deployment per vision expert, each scaled on its own (see
:mod:`pipelines.serve.app`)."""
