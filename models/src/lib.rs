//! GPT-2 and BERT with a drop-in attention choice (work in progress in this session).
