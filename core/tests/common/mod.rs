pub mod simnet;
