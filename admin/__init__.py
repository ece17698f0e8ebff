"""The operator's tools (CLI, use cases, fleet report, IAM policy), outside the Lambda package."""
