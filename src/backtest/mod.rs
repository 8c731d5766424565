pub mod csv;
pub mod report;
