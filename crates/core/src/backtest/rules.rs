//! Rule strategies: entry and exit conditions written as expressions over the candles and
//! indicators, compiled once ([`compile`]) and evaluated incrementally, one closed candle at a
//! time (the same compiled rules can run in a backtest and live).
//!
//! # The expression language
//!
//! - numbers: `30`, `1.5`, `1e-3`;
//! - the candle's fields: `open`, `high`, `low`, `close`, `volume`;
//! - indicators, by their spec names ([`Spec`]): the kinds reading only the close (`sma`,
//!   `ema`, `wma`, `rsi`, `macd`, `bbands`) take an optional source first, any expression
//!   (`sma(close,10)`, `sma(10)` = `sma(close,10)`, `sma(volume,20)`, `ema(close-open,5)`);
//!   the others read the whole candle and take their numeric parameters only (`atr(14)`,
//!   `stoch(14,3,3).k`, `obv`). Parameters are number literals, validated as the spec
//!   `kind(p1,p2,..)` by [`Spec::parse`] (so `rsi(0)` and `macd(26,12,9)` get its messages).
//!   An indicator with several outputs needs one picked with `.name` (`macd(12,26,9).signal`,
//!   `bbands(20,2,2).upper`); a single-output one takes none (or `.value`);
//! - `+ - * /`, unary `-`, comparisons `< <= > >= == !=` (they do not chain), `and`, `or`,
//!   `not`, parentheses. Precedence from the lowest: `or`, `and`, `not`, comparisons, `+ -`,
//!   `* /`, unary `-`; binary operators are left-associative. Names are case-insensitive;
//! - `cross_above(a, b)`: backtesting.py's `crossover` — `a` was below `b` at the previous
//!   candle and is above it now; `cross_below(a, b)` is `cross_above(b, a)`;
//! - `prev(x, k)`: `x` as it was `k` candles ago (`k` a whole-number literal from 1 to
//!   100000), NaN without enough history.
//!
//! Values are `f64`. Comparisons and logic give 1.0 or 0.0; arithmetic propagates NaN (and
//! IEEE infinities: `1/0` is `inf`). NaN is false in a boolean context (so `not` of NaN is
//! 1.0) and every comparison with a NaN is false, `!=` included (unlike IEEE and numpy, where
//! `nan != x` is true: a NaN never makes a condition hold).
//!
//! # Evaluation
//!
//! Every expression is compiled into nodes in evaluation order, and every node is stepped on
//! every candle ([`Strategy::on_candle`]), whether or not its value is needed: one
//! [`Indicator`] state per indicator call, a ring buffer per `prev`, the previous values of
//! `a` and `b` per cross. A close-only indicator is fed [`Bar::from_close`] of its source's
//! value; it is fed from the first candle its source is defined at, and a NaN source later
//! (e.g. `0/0`) restarts it from scratch (its warm-up again) rather than poisoning its running
//! sums for good. The strategy declares no engine indicators ([`Strategy::indicators`] is
//! empty); [`Strategy::extra_warmup`] is the rules' warm-up: the first candle at which every
//! rule's inputs are defined (an indicator's lookback plus its source's, `prev`'s `k` plus its
//! argument's, the slowest operand of an operator), so the engine starts trading after it as
//! backtesting.py does.
//!
//! # The action per candle
//!
//! With `position` the open position after the candle (> 0 long, < 0 short):
//! 1. `long_entry` holds and `position <= 0` → [`Action::Buy`];
//! 2. else `short_entry` holds and `position >= 0` → [`Action::Sell`];
//! 3. else `position > 0` and `long_exit` holds → [`Action::Close`];
//! 4. else `position < 0` and `short_exit` holds → [`Action::Close`];
//! 5. else [`Action::Hold`].
//!
//! A missing rule never holds. At least one entry is required; an exit needs its entry.
//! `stop_loss_pct` and `take_profit_pct` are percents of the entry price (5 = 5 %), from
//! above 0 to below 100; [`Strategy::stops`] gives them as fractions.

use std::fmt;

use super::{Action, Candle, Strategy};
use crate::indicators::{Bar, Indicator, Kind, Spec, SpecError, MAX_PERIOD};

/// A rule file's contents (parsed from YAML by the main crate).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    pub long_entry: Option<String>,
    pub long_exit: Option<String>,
    pub short_entry: Option<String>,
    pub short_exit: Option<String>,
    /// Percent of the entry price (5 = 5 %).
    pub stop_loss_pct: Option<f64>,
    /// Percent of the entry price (5 = 5 %).
    pub take_profit_pct: Option<f64>,
}

/// Why rules were refused: the field, the 1-based column (in characters) into its expression
/// (0 when the error is about the whole field) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// `long_entry`, `long_exit`, `short_entry`, `short_exit`, `stop_loss_pct` or
    /// `take_profit_pct`.
    pub field: String,
    /// The field's expression (empty for the numeric fields).
    pub expression: String,
    /// 1-based, in characters; 0 for the whole field.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RuleError {
    /// `long_entry, column 27: expected ',' or ')' after an argument of cross_above`, then the
    /// expression and a caret under the column.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.column == 0 {
            return write!(f, "{}: {}", self.field, self.message);
        }
        // One character per column: line breaks and tabs shown as spaces.
        let line: String = self
            .expression
            .chars()
            .map(|c| if c.is_whitespace() { ' ' } else { c })
            .collect();
        write!(
            f,
            "{}, column {}: {}\n  {}\n  {}^",
            self.field,
            self.column,
            self.message,
            line.trim_end(),
            " ".repeat(self.column - 1)
        )
    }
}

impl std::error::Error for RuleError {}

/// Compiles `rules` into a strategy (fresh state: feed it from the first candle).
pub fn compile(rules: &RuleSet) -> Result<RuleStrategy, RuleError> {
    let whole = |field: &str, message: String| RuleError {
        field: field.to_string(),
        expression: String::new(),
        column: 0,
        message,
    };
    if rules.long_entry.is_none() && rules.short_entry.is_none() {
        return Err(whole(
            "long_entry",
            "at least one of long_entry and short_entry is required".to_string(),
        ));
    }
    if rules.long_exit.is_some() && rules.long_entry.is_none() {
        return Err(whole(
            "long_exit",
            "a long_exit needs a long_entry (nothing else opens a long position)".to_string(),
        ));
    }
    if rules.short_exit.is_some() && rules.short_entry.is_none() {
        return Err(whole(
            "short_exit",
            "a short_exit needs a short_entry (nothing else opens a short position)".to_string(),
        ));
    }
    let pct = |field: &str, v: Option<f64>| -> Result<Option<f64>, RuleError> {
        match v {
            None => Ok(None),
            Some(p) if p > 0.0 && p < 100.0 => Ok(Some(p / 100.0)),
            Some(p) => Err(whole(
                field,
                format!("must be a percent above 0 and below 100 (5 = 5 %), not {p}"),
            )),
        }
    };
    let stops = (
        pct("stop_loss_pct", rules.stop_loss_pct)?,
        pct("take_profit_pct", rules.take_profit_pct)?,
    );
    let mut c = Compiler::default();
    let mut roots = [None; 4];
    let fields = [
        ("long_entry", &rules.long_entry),
        ("short_entry", &rules.short_entry),
        ("long_exit", &rules.long_exit),
        ("short_exit", &rules.short_exit),
    ];
    for (k, (field, expr)) in fields.into_iter().enumerate() {
        if let Some(expr) = expr {
            let root = c.expression(expr).map_err(|(column, message)| RuleError {
                field: field.to_string(),
                expression: expr.clone(),
                column,
                message,
            })?;
            roots[k] = Some(root);
        }
    }
    let warmup = roots
        .iter()
        .flatten()
        .map(|&r| c.lookback.get(r).copied().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let values = vec![f64::NAN; c.nodes.len()];
    Ok(RuleStrategy {
        nodes: c.nodes,
        values,
        roots,
        warmup,
        stops,
    })
}

/// Compiled rules: the nodes of every expression with their incremental state.
#[derive(Debug, Clone)]
pub struct RuleStrategy {
    /// In evaluation order: a node's operands come before it.
    nodes: Vec<Node>,
    /// Each node's value at the last candle.
    values: Vec<f64>,
    /// long_entry, short_entry, long_exit, short_exit.
    roots: [Option<usize>; 4],
    warmup: usize,
    stops: (Option<f64>, Option<f64>),
}

impl RuleStrategy {
    /// Back to the state before the first candle (to run the same rules over another series).
    pub fn reset(&mut self) {
        for n in &mut self.nodes {
            n.reset();
        }
        self.values.fill(f64::NAN);
    }

    /// Steps every node by one closed candle.
    fn step(&mut self, bar: &Bar) {
        for i in 0..self.nodes.len() {
            let v = self.nodes[i].step(bar, &self.values);
            self.values[i] = v;
        }
    }

    /// Whether rule `k` (a `roots` slot) held at the last candle; false when it is missing.
    fn holds(&self, k: usize) -> bool {
        self.roots[k].is_some_and(|r| truthy(at(&self.values, r)))
    }
}

impl Strategy for RuleStrategy {
    fn indicators(&self) -> Vec<Spec> {
        Vec::new()
    }

    fn extra_warmup(&self) -> usize {
        self.warmup
    }

    fn on_candle(&mut self, candle: &Candle<'_>) -> Action {
        self.step(&candle.bar);
        let p = candle.position;
        if self.holds(0) && p <= 0.0 {
            Action::Buy
        } else if self.holds(1) && p >= 0.0 {
            Action::Sell
        } else if (p > 0.0 && self.holds(2)) || (p < 0.0 && self.holds(3)) {
            Action::Close
        } else {
            Action::Hold
        }
    }

    fn stops(&self) -> (Option<f64>, Option<f64>) {
        self.stops
    }
}

fn truthy(x: f64) -> bool {
    !x.is_nan() && x != 0.0
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// `values[i]`, NaN out of range (never, by construction).
fn at(values: &[f64], i: usize) -> f64 {
    values.get(i).copied().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------------
// Evaluation

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Open,
    High,
    Low,
    Close,
    Volume,
}

const FIELDS: [(&str, Field); 5] = [
    ("open", Field::Open),
    ("high", Field::High),
    ("low", Field::Low),
    ("close", Field::Close),
    ("volume", Field::Volume),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

impl BinOp {
    fn apply(self, a: f64, b: f64) -> f64 {
        let defined = !a.is_nan() && !b.is_nan();
        match self {
            BinOp::Add => a + b,
            BinOp::Sub => a - b,
            BinOp::Mul => a * b,
            BinOp::Div => a / b,
            BinOp::Lt => flag(a < b),
            BinOp::Le => flag(a <= b),
            BinOp::Gt => flag(a > b),
            BinOp::Ge => flag(a >= b),
            BinOp::Eq => flag(a == b),
            BinOp::Ne => flag(defined && a != b),
            BinOp::And => flag(truthy(a) && truthy(b)),
            BinOp::Or => flag(truthy(a) || truthy(b)),
        }
    }
}

#[derive(Debug, Clone)]
struct IndicatorNode {
    state: Indicator,
    /// The source's node for a close-only kind; `None` for the whole-bar kinds.
    source: Option<usize>,
    /// The selected output.
    output: usize,
    out: Vec<f64>,
}

#[derive(Debug, Clone)]
enum Node {
    Const(f64),
    Field(Field),
    Neg(usize),
    Not(usize),
    Bin(BinOp, usize, usize),
    Indicator(Box<IndicatorNode>),
    /// `ring[pos]` is the value `k` candles ago (NaN at first).
    Prev {
        x: usize,
        ring: Vec<f64>,
        pos: usize,
    },
    Cross {
        a: usize,
        b: usize,
        a_prev: f64,
        b_prev: f64,
    },
}

impl Node {
    fn step(&mut self, bar: &Bar, v: &[f64]) -> f64 {
        match self {
            Node::Const(x) => *x,
            Node::Field(f) => match f {
                Field::Open => bar.open,
                Field::High => bar.high,
                Field::Low => bar.low,
                Field::Close => bar.close,
                Field::Volume => bar.volume,
            },
            Node::Neg(a) => -at(v, *a),
            Node::Not(a) => flag(!truthy(at(v, *a))),
            Node::Bin(op, a, b) => op.apply(at(v, *a), at(v, *b)),
            Node::Indicator(n) => {
                let input = match n.source {
                    Some(s) => {
                        let x = at(v, s);
                        if x.is_nan() {
                            // Fed from the source's first defined value; restarted after a NaN.
                            if n.state.bars_seen() > 0 {
                                n.state = Indicator::new(n.state.spec());
                            }
                            return f64::NAN;
                        }
                        Bar::from_close(x)
                    }
                    None => *bar,
                };
                n.state.update(&input, &mut n.out);
                n.out.get(n.output).copied().unwrap_or(f64::NAN)
            }
            Node::Prev { x, ring, pos } => {
                let Some(slot) = ring.get_mut(*pos) else {
                    return f64::NAN;
                };
                let old = std::mem::replace(slot, at(v, *x));
                *pos = (*pos + 1) % ring.len();
                old
            }
            Node::Cross {
                a,
                b,
                a_prev,
                b_prev,
            } => {
                let (x, y) = (at(v, *a), at(v, *b));
                let crossed = *a_prev < *b_prev && x > y;
                (*a_prev, *b_prev) = (x, y);
                flag(crossed)
            }
        }
    }

    fn reset(&mut self) {
        match self {
            Node::Indicator(n) => {
                n.state = Indicator::new(n.state.spec());
                n.out.fill(f64::NAN);
            }
            Node::Prev { ring, pos, .. } => {
                ring.fill(f64::NAN);
                *pos = 0;
            }
            Node::Cross { a_prev, b_prev, .. } => {
                *a_prev = f64::NAN;
                *b_prev = f64::NAN;
            }
            Node::Const(_) | Node::Field(_) | Node::Neg(_) | Node::Not(_) | Node::Bin(..) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing

/// The longest expression accepted, in tokens (bounds the tree's depth).
const MAX_TOKENS: usize = 1000;
/// The deepest nesting of parentheses, calls and unary operators accepted.
const MAX_NESTING: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    LParen,
    RParen,
    Comma,
    Dot,
    Op(BinOp),
    End,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// 1-based, in characters.
    col: usize,
    /// As written.
    text: String,
}

/// An error at a column.
type Failure = (usize, String);

fn lex(src: &str) -> Result<Vec<Token>, Failure> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let digit_at = |j: usize| chars.get(j).is_some_and(|c| c.is_ascii_digit());
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if out.len() >= MAX_TOKENS {
            return Err((
                col,
                format!("the expression is too long (more than {MAX_TOKENS} tokens)"),
            ));
        }
        let start = i;
        let tok = if c.is_ascii_digit() || (c == '.' && digit_at(i + 1)) {
            while digit_at(i) {
                i += 1;
            }
            if chars.get(i) == Some(&'.') {
                i += 1;
                while digit_at(i) {
                    i += 1;
                }
            }
            if matches!(chars.get(i), Some('e' | 'E')) {
                let sign = matches!(chars.get(i + 1), Some('+' | '-'));
                let first = if sign { i + 2 } else { i + 1 };
                if digit_at(first) {
                    i = first;
                    while digit_at(i) {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().collect();
            match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Tok::Num(v),
                _ => return Err((col, format!("the number {text} is out of range"))),
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            while chars
                .get(i)
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            Tok::Ident(name.to_ascii_lowercase())
        } else {
            let next = chars.get(i + 1).copied();
            let (tok, len) = match (c, next) {
                ('(', _) => (Tok::LParen, 1),
                (')', _) => (Tok::RParen, 1),
                (',', _) => (Tok::Comma, 1),
                ('.', _) => (Tok::Dot, 1),
                ('+', _) => (Tok::Op(BinOp::Add), 1),
                ('-', _) => (Tok::Op(BinOp::Sub), 1),
                ('*', _) => (Tok::Op(BinOp::Mul), 1),
                ('/', _) => (Tok::Op(BinOp::Div), 1),
                ('<', Some('=')) => (Tok::Op(BinOp::Le), 2),
                ('<', _) => (Tok::Op(BinOp::Lt), 1),
                ('>', Some('=')) => (Tok::Op(BinOp::Ge), 2),
                ('>', _) => (Tok::Op(BinOp::Gt), 1),
                ('=', Some('=')) => (Tok::Op(BinOp::Eq), 2),
                ('!', Some('=')) => (Tok::Op(BinOp::Ne), 2),
                ('=', _) => return Err((col, "'=' is not an operator: compare with ==".into())),
                ('!', _) => return Err((col, "'!' is not an operator: use not, or !=".into())),
                ('&', _) => return Err((col, "'&' is not an operator: use and".into())),
                ('|', _) => return Err((col, "'|' is not an operator: use or".into())),
                _ => return Err((col, format!("unexpected character {c:?}"))),
            };
            i += len;
            tok
        };
        out.push(Token {
            tok,
            col,
            text: chars[start..i].iter().collect(),
        });
    }
    out.push(Token {
        tok: Tok::End,
        col: chars.len() + 1,
        text: String::new(),
    });
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Parsing

/// An output picked with `.name`, and its column.
type Output = Option<(String, usize)>;

#[derive(Debug)]
enum Ast {
    Num {
        v: f64,
        text: String,
        col: usize,
    },
    Name {
        name: String,
        col: usize,
        output: Output,
    },
    Call {
        name: String,
        col: usize,
        args: Vec<Ast>,
        output: Output,
    },
    Neg {
        col: usize,
        a: Box<Ast>,
    },
    Not {
        col: usize,
        a: Box<Ast>,
    },
    Bin {
        op: BinOp,
        a: Box<Ast>,
        b: Box<Ast>,
    },
}

impl Ast {
    /// A number literal, possibly negated: its value, text and column.
    fn literal(&self) -> Option<(f64, String, usize)> {
        match self {
            Ast::Num { v, text, col } => Some((*v, text.clone(), *col)),
            Ast::Neg { col, a } => match &**a {
                Ast::Num { v, text, .. } => Some((-v, format!("-{text}"), *col)),
                _ => None,
            },
            _ => None,
        }
    }

    /// The column it starts at.
    fn col(&self) -> usize {
        match self {
            Ast::Num { col, .. }
            | Ast::Name { col, .. }
            | Ast::Call { col, .. }
            | Ast::Neg { col, .. }
            | Ast::Not { col, .. } => *col,
            Ast::Bin { a, .. } => a.col(),
        }
    }
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
    nesting: usize,
}

fn describe(t: &Token) -> String {
    match t.tok {
        Tok::End => "the end of the expression".to_string(),
        _ => format!("'{}'", t.text),
    }
}

fn is_keyword(name: &str) -> bool {
    matches!(name, "and" | "or" | "not")
}

impl Parser {
    fn peek(&self) -> &Token {
        // `lex` always ends the tokens with `End`, which is never consumed.
        &self.toks[self.pos.min(self.toks.len() - 1)]
    }

    fn advance(&mut self) -> Token {
        let t = self.peek().clone();
        if t.tok != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn is_word(&self, w: &str) -> bool {
        matches!(&self.peek().tok, Tok::Ident(n) if n == w)
    }

    fn enter(&mut self, col: usize) -> Result<(), Failure> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err((
                col,
                format!("the expression is nested too deeply (more than {MAX_NESTING} levels)"),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.nesting -= 1;
    }

    fn parse(mut self) -> Result<Ast, Failure> {
        if self.peek().tok == Tok::End {
            return Err((1, "empty expression".to_string()));
        }
        let e = self.or()?;
        let t = self.peek();
        if t.tok != Tok::End {
            return Err((
                t.col,
                format!(
                    "unexpected {} after a complete expression (a missing operator?)",
                    describe(t)
                ),
            ));
        }
        Ok(e)
    }

    fn or(&mut self) -> Result<Ast, Failure> {
        let mut a = self.and()?;
        while self.is_word("or") {
            self.advance();
            let b = self.and()?;
            a = Ast::Bin {
                op: BinOp::Or,
                a: Box::new(a),
                b: Box::new(b),
            };
        }
        Ok(a)
    }

    fn and(&mut self) -> Result<Ast, Failure> {
        let mut a = self.not()?;
        while self.is_word("and") {
            self.advance();
            let b = self.not()?;
            a = Ast::Bin {
                op: BinOp::And,
                a: Box::new(a),
                b: Box::new(b),
            };
        }
        Ok(a)
    }

    fn not(&mut self) -> Result<Ast, Failure> {
        if self.is_word("not") {
            let t = self.advance();
            self.enter(t.col)?;
            let a = self.not()?;
            self.leave();
            return Ok(Ast::Not {
                col: t.col,
                a: Box::new(a),
            });
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Ast, Failure> {
        let a = self.sum()?;
        let Tok::Op(op @ (BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne)) =
            self.peek().tok
        else {
            return Ok(a);
        };
        self.advance();
        let b = self.sum()?;
        let t = self.peek();
        if let Tok::Op(BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne) =
            t.tok
        {
            return Err((
                t.col,
                "comparisons do not chain: write a < b and b < c".to_string(),
            ));
        }
        Ok(Ast::Bin {
            op,
            a: Box::new(a),
            b: Box::new(b),
        })
    }

    fn sum(&mut self) -> Result<Ast, Failure> {
        let mut a = self.product()?;
        while let Tok::Op(op @ (BinOp::Add | BinOp::Sub)) = self.peek().tok {
            self.advance();
            let b = self.product()?;
            a = Ast::Bin {
                op,
                a: Box::new(a),
                b: Box::new(b),
            };
        }
        Ok(a)
    }

    fn product(&mut self) -> Result<Ast, Failure> {
        let mut a = self.unary()?;
        while let Tok::Op(op @ (BinOp::Mul | BinOp::Div)) = self.peek().tok {
            self.advance();
            let b = self.unary()?;
            a = Ast::Bin {
                op,
                a: Box::new(a),
                b: Box::new(b),
            };
        }
        Ok(a)
    }

    fn unary(&mut self) -> Result<Ast, Failure> {
        if self.peek().tok == Tok::Op(BinOp::Sub) {
            let t = self.advance();
            self.enter(t.col)?;
            let a = self.unary()?;
            self.leave();
            return Ok(Ast::Neg {
                col: t.col,
                a: Box::new(a),
            });
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Ast, Failure> {
        let t = self.advance();
        match t.tok {
            Tok::Num(v) => Ok(Ast::Num {
                v,
                text: t.text,
                col: t.col,
            }),
            Tok::LParen => {
                self.enter(t.col)?;
                let e = self.or()?;
                self.leave();
                let close = self.peek();
                if close.tok != Tok::RParen {
                    return Err((
                        close.col,
                        format!(
                            "expected ')' to close the '(' at column {} but found {}",
                            t.col,
                            describe(close)
                        ),
                    ));
                }
                self.advance();
                Ok(e)
            }
            Tok::Ident(name) if !is_keyword(&name) => {
                if self.peek().tok == Tok::LParen {
                    let open = self.advance();
                    self.enter(open.col)?;
                    let args = self.arguments(&name)?;
                    self.leave();
                    let output = self.output()?;
                    Ok(Ast::Call {
                        name,
                        col: t.col,
                        args,
                        output,
                    })
                } else {
                    let output = self.output()?;
                    Ok(Ast::Name {
                        name,
                        col: t.col,
                        output,
                    })
                }
            }
            _ => Err((
                t.col,
                format!(
                    "expected a number, a name or '(' but found {}",
                    describe(&t)
                ),
            )),
        }
    }

    /// After `name(`: the arguments and the closing ')'.
    fn arguments(&mut self, name: &str) -> Result<Vec<Ast>, Failure> {
        let mut args = Vec::new();
        if self.peek().tok == Tok::RParen {
            self.advance();
            return Ok(args);
        }
        loop {
            args.push(self.or()?);
            let t = self.advance();
            match t.tok {
                Tok::Comma => {}
                Tok::RParen => return Ok(args),
                _ => {
                    return Err((
                        t.col,
                        format!(
                            "expected ',' or ')' after an argument of {name} but found {}",
                            describe(&t)
                        ),
                    ))
                }
            }
        }
    }

    /// An optional `.name`.
    fn output(&mut self) -> Result<Output, Failure> {
        if self.peek().tok != Tok::Dot {
            return Ok(None);
        }
        self.advance();
        let t = self.advance();
        match t.tok {
            Tok::Ident(name) => Ok(Some((name, t.col))),
            _ => Err((
                t.col,
                format!(
                    "expected an output name after '.' but found {}",
                    describe(&t)
                ),
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compiling

/// The kinds that read only the close (and so take a source).
fn reads_close_only(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Sma | Kind::Ema | Kind::Wma | Kind::Rsi | Kind::Macd | Kind::Bbands
    )
}

/// A kind's parameter count and names, as [`Spec::parse`] knows them.
fn parameters(kind: Kind) -> (usize, String) {
    match Spec::parse(kind.as_str()) {
        Err(SpecError::Arity {
            expected, names, ..
        }) => (expected, names.to_string()),
        _ => (0, String::new()),
    }
}

/// `sma(period)`, or `obv` without parameters.
fn signature(kind: Kind, names: &str, source: bool) -> String {
    match (names.is_empty(), source) {
        (true, _) => kind.as_str().to_string(),
        (false, false) => format!("{kind}({names})"),
        (false, true) => format!("{kind}(source, {names})"),
    }
}

fn or_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

#[derive(Default)]
struct Compiler {
    nodes: Vec<Node>,
    /// Per node: the first candle index at which it is defined.
    lookback: Vec<usize>,
}

impl Compiler {
    fn expression(&mut self, src: &str) -> Result<usize, Failure> {
        let ast = Parser {
            toks: lex(src)?,
            pos: 0,
            nesting: 0,
        }
        .parse()?;
        self.lower(&ast)
    }

    fn push(&mut self, node: Node, lookback: usize) -> usize {
        self.nodes.push(node);
        self.lookback.push(lookback);
        self.nodes.len() - 1
    }

    fn lb(&self, i: usize) -> usize {
        self.lookback.get(i).copied().unwrap_or(0)
    }

    fn lower(&mut self, ast: &Ast) -> Result<usize, Failure> {
        match ast {
            Ast::Num { v, .. } => Ok(self.push(Node::Const(*v), 0)),
            Ast::Neg { a, .. } => {
                let a = self.lower(a)?;
                Ok(self.push(Node::Neg(a), self.lb(a)))
            }
            Ast::Not { a, .. } => {
                let a = self.lower(a)?;
                Ok(self.push(Node::Not(a), self.lb(a)))
            }
            Ast::Bin { op, a, b } => {
                let (a, b) = (self.lower(a)?, self.lower(b)?);
                let lb = self.lb(a).max(self.lb(b));
                Ok(self.push(Node::Bin(*op, a, b), lb))
            }
            Ast::Name { name, col, output } => {
                if let Some(&(_, f)) = FIELDS.iter().find(|(n, _)| n == name) {
                    if let Some((_, ocol)) = output {
                        return Err((*ocol, format!("the candle field {name} has no outputs")));
                    }
                    return Ok(self.push(Node::Field(f), 0));
                }
                if let Some(kind) = Kind::ALL.iter().copied().find(|k| k.as_str() == name) {
                    let (count, names) = parameters(kind);
                    if count == 0 {
                        return self.indicator(kind, *col, &[], output);
                    }
                    return Err((
                        *col,
                        format!(
                            "{name} needs its parameters: {}",
                            signature(kind, &names, false)
                        ),
                    ));
                }
                if matches!(name.as_str(), "cross_above" | "cross_below" | "prev") {
                    return Err((
                        *col,
                        format!("{name} is a function: {name}(a, b) needs its arguments"),
                    ));
                }
                Err((
                    *col,
                    format!(
                        "unknown name {name:?} (the candle's fields are open, high, low, close \
                         and volume; indicators are called: sma(close,10))"
                    ),
                ))
            }
            Ast::Call {
                name,
                col,
                args,
                output,
            } => {
                if let Some(kind) = Kind::ALL.iter().copied().find(|k| k.as_str() == name) {
                    return self.indicator(kind, *col, args, output);
                }
                let func = matches!(name.as_str(), "cross_above" | "cross_below" | "prev");
                if !func {
                    let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
                    return Err((
                        *col,
                        format!(
                            "unknown function {name:?} (functions: cross_above, cross_below, \
                             prev; indicators: {})",
                            kinds.join(", ")
                        ),
                    ));
                }
                if let Some((_, ocol)) = output {
                    return Err((*ocol, format!("{name} has no outputs to pick")));
                }
                let [a, b] = args.as_slice() else {
                    let params = if name == "prev" { "x, k" } else { "a, b" };
                    return Err((
                        *col,
                        format!("{name} takes 2 arguments ({params}), got {}", args.len()),
                    ));
                };
                if name == "prev" {
                    let k = match b.literal() {
                        Some((v, _, _)) if v.fract() == 0.0 && (1.0..=f64::from(MAX_PERIOD)).contains(&v) => {
                            v as usize
                        }
                        Some((_, text, kcol)) => {
                            return Err((
                                kcol,
                                format!(
                                    "prev's k must be a whole number from 1 to {MAX_PERIOD}, not {text}"
                                ),
                            ))
                        }
                        None => {
                            return Err((
                                b.col(),
                                format!(
                                    "prev's k must be a number literal (a whole number from 1 \
                                     to {MAX_PERIOD})"
                                ),
                            ))
                        }
                    };
                    let x = self.lower(a)?;
                    let lb = self.lb(x).saturating_add(k);
                    return Ok(self.push(
                        Node::Prev {
                            x,
                            ring: vec![f64::NAN; k],
                            pos: 0,
                        },
                        lb,
                    ));
                }
                let (mut a, mut b) = (self.lower(a)?, self.lower(b)?);
                if name == "cross_below" {
                    std::mem::swap(&mut a, &mut b);
                }
                let lb = self.lb(a).max(self.lb(b));
                Ok(self.push(
                    Node::Cross {
                        a,
                        b,
                        a_prev: f64::NAN,
                        b_prev: f64::NAN,
                    },
                    lb,
                ))
            }
        }
    }

    /// An indicator call `kind(args).output` at column `col`.
    fn indicator(
        &mut self,
        kind: Kind,
        col: usize,
        args: &[Ast],
        output: &Output,
    ) -> Result<usize, Failure> {
        let (count, names) = parameters(kind);
        let close_only = reads_close_only(kind);
        let (source, params) = match args.split_first() {
            Some((first, rest)) if args.len() > count && first.literal().is_none() => {
                if !close_only {
                    return Err((
                        first.col(),
                        format!(
                            "{kind} reads the whole candle and takes no source: write {}",
                            signature(kind, &names, false)
                        ),
                    ));
                }
                (Some(first), rest)
            }
            _ => (None, args),
        };
        let mut texts = Vec::with_capacity(params.len());
        for p in params {
            let Some((_, text, _)) = p.literal() else {
                let how = if close_only {
                    format!(
                        "{} or {}",
                        signature(kind, &names, false),
                        signature(kind, &names, true)
                    )
                } else {
                    signature(kind, &names, false)
                };
                return Err((
                    p.col(),
                    format!("{kind}'s parameters must be number literals: {how}"),
                ));
            };
            texts.push(text);
        }
        let text = if texts.is_empty() {
            kind.as_str().to_string()
        } else {
            format!("{kind}({})", texts.join(","))
        };
        let spec = Spec::parse(&text).map_err(|e| (col, e.to_string()))?;
        let outputs = spec.outputs();
        let picked = match output {
            Some((o, ocol)) => outputs.iter().position(|n| n == o).ok_or_else(|| {
                let all: Vec<String> = outputs.iter().map(|n| format!(".{n}")).collect();
                (
                    *ocol,
                    format!("{spec} has no output {o:?} (it has {})", or_list(&all)),
                )
            })?,
            None if outputs.len() == 1 => 0,
            None => {
                let all: Vec<String> = outputs.iter().map(|n| format!(".{n}")).collect();
                return Err((
                    col,
                    format!(
                        "{spec} has several outputs: pick one with {}",
                        or_list(&all)
                    ),
                ));
            }
        };
        let (source, source_lb) = if close_only {
            let s = match source {
                Some(s) => self.lower(s)?,
                None => self.push(Node::Field(Field::Close), 0),
            };
            (Some(s), self.lb(s))
        } else {
            (None, 0)
        };
        let lb = source_lb.saturating_add(spec.lookback());
        let node = IndicatorNode {
            state: Indicator::new(&spec),
            source,
            output: picked,
            out: vec![f64::NAN; outputs.len()],
        };
        Ok(self.push(Node::Indicator(Box::new(node)), lb))
    }
}

#[cfg(test)]
mod tests;
