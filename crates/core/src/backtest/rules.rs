//! Rule strategies: expressions over candles and indicators (filled in by the rules work).
