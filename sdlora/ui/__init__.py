"""What a user meets: the `sdlora` command, the Gradio app, the demo, and the training report with its CLIP scores."""
