//! Training low-rank activation predictors. In progress.
