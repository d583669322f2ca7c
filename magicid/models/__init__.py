"""Generation models: backbone loading, ID encoder, MGMICA attention, MMF ControlNet, MagicIDPipeline."""
