"""Privacy budget reports: numbers from the ledger (build), plots (plots), HTML/Markdown/JSON (render)."""
