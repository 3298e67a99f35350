"""Engine backends: place taps on an engine's real modules and describe each forward's batch
as a StepLayout for the agent core (backends/base.py is the engine contract: Backend, AgentPort)."""
