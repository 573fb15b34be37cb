//! The fake Guest's script language: what a Guest does, one instruction per line
//! (docs/lguest-guest.md is the reference; this file is its implementation).
//!
//! A script is parsed once, completely, before any Guest runs it: every mistake a script
//! can contain (an unknown instruction, a bad number, a label nobody defines, a `repeat`
//! without its `end`, an interrupt the launcher ABI cannot raise) is a [`ParseError`] with
//! its line, so `fakehost serve --lguest-guest` and `fakehost lguest script` refuse it up
//! front. What is left for run time are the things only the Launcher's memory can tell: an
//! address expression's value (`mem` is read from the boot_params at gpa 0), an `expect`
//! that does not match, an interrupt that never comes.
//!
//! The program is flat: labels become instruction indexes, and each `repeat ... end` pair
//! becomes two instructions sharing a counter slot, so a `goto` may go anywhere without a
//! runtime stack to unwind. Next: [`super::guest`], which executes it.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

/// The longest script accepted (bytes of text).
pub const MAX_SCRIPT_LEN: usize = 1 << 20;
/// The most bytes one `read` may ask for.
pub const MAX_READ_LEN: u32 = 64 << 10;
/// Where `print`, `crash` and `console` put their bytes until a `scratch` says otherwise.
pub const DEFAULT_SCRATCH: u64 = 0x8_0000;

/// The scripts built into fakehost: the fixtures of `fixtures/lguest/`, by name.
/// `console-hello` is what a Guest runs when `fakehost serve` gets no `--lguest-guest`.
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "console-hello",
        include_str!("../../../fixtures/lguest/console-hello.guest"),
    ),
    (
        "pingpong",
        include_str!("../../../fixtures/lguest/pingpong.guest"),
    ),
    (
        "errno",
        include_str!("../../../fixtures/lguest/errno.guest"),
    ),
    (
        "attach",
        include_str!("../../../fixtures/lguest/attach.guest"),
    ),
    (
        "bench-read",
        include_str!("../../../fixtures/lguest/bench-read.guest"),
    ),
    (
        "bench-eventfd",
        include_str!("../../../fixtures/lguest/bench-eventfd.guest"),
    ),
    ("halt", include_str!("../../../fixtures/lguest/halt.guest")),
    (
        "restart",
        include_str!("../../../fixtures/lguest/restart.guest"),
    ),
    (
        "badread",
        include_str!("../../../fixtures/lguest/badread.guest"),
    ),
];

/// The built-in script every Guest runs by default.
pub const DEFAULT_BUILTIN: &str = "console-hello";

/// A script that could not be parsed: the line (1-based) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}: {reason}")]
pub struct ParseError {
    /// The line of the mistake (1-based).
    pub line: u32,
    /// What is wrong, in words.
    pub reason: String,
}

impl ParseError {
    /// `FILE:LINE: reason`, as compilers say it.
    pub fn in_file(&self, file: &str) -> String {
        format!("{file}:{self}")
    }
}

/// A parsed script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// What status displays call it: the file as given, or `builtin:NAME`.
    pub name: String,
    /// The instructions, in order; jumps are indexes into it.
    pub program: Vec<Step>,
    /// How many `repeat` counters the program needs.
    pub repeat_slots: usize,
}

/// One instruction and the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its line in the script (1-based), for messages and status.
    pub line: u32,
    /// What it does.
    pub op: Op,
}

/// An instruction (docs/lguest-guest.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `notify ADDR`: LHCALL_NOTIFY, then stop until the next RUN.
    Notify(Expr),
    /// `print "TEXT"`: TEXT and a NUL at `scratch`, then notify `scratch`.
    Print(Vec<u8>),
    /// `wait-irq N [TIMEOUT]`.
    WaitIrq {
        /// The interrupt (below 32).
        irq: u32,
        /// None: forever.
        timeout: Option<Duration>,
    },
    /// `halt [TIMEOUT]`: until any interrupt is pending.
    Halt {
        /// None: forever.
        timeout: Option<Duration>,
    },
    /// `sleep DURATION`.
    Sleep(Duration),
    /// `write ADDR VALUE...`.
    Write {
        /// Where the first value goes.
        addr: Expr,
        /// The values, laid out one after the other.
        values: Vec<Value>,
    },
    /// `expect ADDR VALUE...`.
    Expect {
        /// Where the first value is.
        addr: Expr,
        /// The values wanted there, one after the other.
        values: Vec<Value>,
    },
    /// `read ADDR LEN`.
    Read {
        /// Where.
        addr: Expr,
        /// How many bytes (1..=[`MAX_READ_LEN`]).
        len: u32,
    },
    /// `console "TEXT"`: the virtio console driver writes TEXT.
    Console(Vec<u8>),
    /// `crash "MSG"`: LHCALL_SHUTDOWN(scratch, poweroff) with MSG at scratch.
    Crash(Vec<u8>),
    /// `restart`: LHCALL_SHUTDOWN(scratch, restart).
    Restart,
    /// `kill "REASON"`: the host kills the Guest with REASON.
    Kill(String),
    /// `goto LABEL`: the index of the instruction after the label.
    Goto(usize),
    /// `repeat N`: sets its counter to N; with N = 0 jumps to `end` (the index after the
    /// matching `end`).
    RepeatStart {
        /// Its counter.
        slot: usize,
        /// N.
        count: u64,
        /// The instruction after the matching `end`.
        end: usize,
    },
    /// `end`: one round done; while rounds remain, back to `body` (the first instruction
    /// after the matching `repeat`).
    RepeatEnd {
        /// The counter of the matching `repeat`.
        slot: usize,
        /// Where the body starts.
        body: usize,
    },
    /// `scratch ADDR`.
    Scratch(Expr),
}

/// A name an address expression may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    /// The end of RAM, from the e820 map of the boot_params at gpa 0.
    Mem,
    /// `pfn_limit × 4096`.
    Limit,
    /// The Guest's start address (LHREQ_INITIALIZE's third word).
    Start,
    /// The current scratch address.
    Scratch,
}

/// One term of an address expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// A number.
    Number(u64),
    /// A name, known only at run time.
    Name(Name),
}

/// An address: terms joined by `+` and `-` (wrapping u64 arithmetic, as the Guest's
/// registers would compute it; the host's address check refuses what wrapped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    /// (subtract, term), left to right; the first is never subtracted.
    pub terms: Vec<(bool, Term)>,
}

impl Expr {
    /// The value, given what each name stands for (`value` may fail: `mem` reads memory).
    pub fn eval<E>(&self, mut value: impl FnMut(Name) -> Result<u64, E>) -> Result<u64, E> {
        let mut acc = 0u64;
        for &(minus, term) in &self.terms {
            let v = match term {
                Term::Number(n) => n,
                Term::Name(name) => value(name)?,
            };
            acc = if minus {
                acc.wrapping_sub(v)
            } else {
                acc.wrapping_add(v)
            };
        }
        Ok(acc)
    }

    /// Whether the expression uses `name`.
    pub fn uses(&self, name: Name) -> bool {
        self.terms.iter().any(|&(_, t)| t == Term::Name(name))
    }
}

/// A value of `write` and `expect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `"text"`: the bytes, no NUL added.
    Text(Vec<u8>),
    /// `u8:V`.
    U8(u8),
    /// `u16:V`, little endian.
    U16(u16),
    /// `u32:V`, little endian.
    U32(u32),
    /// `u64:V`, little endian.
    U64(u64),
    /// `hex:DEADBEEF`: the bytes in the order written.
    Hex(Vec<u8>),
}

impl Value {
    /// The bytes it stands for.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Text(b) | Value::Hex(b) => b.clone(),
            Value::U8(v) => vec![*v],
            Value::U16(v) => v.to_le_bytes().to_vec(),
            Value::U32(v) => v.to_le_bytes().to_vec(),
            Value::U64(v) => v.to_le_bytes().to_vec(),
        }
    }

    /// How many bytes it takes.
    pub fn len(&self) -> usize {
        match self {
            Value::Text(b) | Value::Hex(b) => b.len(),
            Value::U8(_) => 1,
            Value::U16(_) => 2,
            Value::U32(_) => 4,
            Value::U64(_) => 8,
        }
    }

    /// Whether it takes no bytes (`""` or `hex:`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `bytes` shown in this value's own form (what `expect` found instead of it).
    pub fn show_like(&self, bytes: &[u8]) -> String {
        let mut le = [0u8; 8];
        let n = bytes.len().min(8);
        le[..n].copy_from_slice(&bytes[..n]);
        let word = u64::from_le_bytes(le);
        match self {
            Value::Text(_) => quote(bytes),
            Value::Hex(_) => format!("hex:{}", hex(bytes)),
            Value::U8(_) => format!("u8:{word:#x}"),
            Value::U16(_) => format!("u16:{word:#x}"),
            Value::U32(_) => format!("u32:{word:#x}"),
            Value::U64(_) => format!("u64:{word:#x}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.show_like(&self.bytes()))
    }
}

/// Bytes as lowercase hex digits, no separators.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Bytes as a script string literal (the escapes the parser takes).
pub fn quote(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\0' => out.push_str("\\0"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('"');
    out
}

/// A duration as scripts write it (`500ms`, `10s`, `2m`).
pub fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A token of one line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Str(Vec<u8>),
}

fn err(line: u32, reason: impl Into<String>) -> ParseError {
    ParseError {
        line,
        reason: reason.into(),
    }
}

/// Splits a line into words and strings; `#` outside a string ends it.
fn tokenize(text: &str, line: u32) -> Result<Vec<Token>, ParseError> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '#' {
            break;
        } else if c == '"' {
            chars.next();
            tokens.push(Token::Str(string_literal(&mut chars, line)?));
        } else {
            let mut word = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '#' {
                    break;
                }
                if c == '"' {
                    return Err(err(
                        line,
                        format!("a string must stand on its own (after {word:?})"),
                    ));
                }
                word.push(c);
                chars.next();
            }
            tokens.push(Token::Word(word));
        }
    }
    Ok(tokens)
}

/// The rest of a string literal after its opening quote, escapes resolved.
fn string_literal(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    line: u32,
) -> Result<Vec<u8>, ParseError> {
    let mut out = Vec::new();
    loop {
        let Some(c) = chars.next() else {
            return Err(err(line, "unterminated string"));
        };
        match c {
            '"' => break,
            '\\' => {
                let Some(e) = chars.next() else {
                    return Err(err(line, "unterminated string"));
                };
                match e {
                    'n' => out.push(b'\n'),
                    't' => out.push(b'\t'),
                    '\\' => out.push(b'\\'),
                    '"' => out.push(b'"'),
                    '0' => out.push(0),
                    'x' => {
                        let digits: String =
                            [chars.next(), chars.next()].into_iter().flatten().collect();
                        match u8::from_str_radix(&digits, 16) {
                            Ok(b) if digits.len() == 2 => out.push(b),
                            _ => {
                                return Err(err(
                                    line,
                                    format!("bad escape \\x{digits}: \\x takes two hex digits"),
                                ))
                            }
                        }
                    }
                    other => {
                        return Err(err(
                            line,
                            format!(
                                "bad escape \\{other} (the escapes are \\n \\t \\\\ \\\" \\0 \\xHH)"
                            ),
                        ))
                    }
                }
            }
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    Ok(out)
}

/// A number: decimal or `0x` hex, `_` allowed between digits.
fn number(word: &str) -> Option<u64> {
    let clean: String = word.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() || word.starts_with('_') || word.ends_with('_') {
        return None;
    }
    if let Some(hex) = clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        if hex.is_empty() {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else if clean.bytes().all(|b| b.is_ascii_digit()) {
        clean.parse().ok()
    } else {
        None
    }
}

fn number_or(word: &str, line: u32, what: &str) -> Result<u64, ParseError> {
    number(word).ok_or_else(|| {
        err(
            line,
            format!("bad number {word:?} for {what} (decimal, or hex with 0x; at most 64 bits)"),
        )
    })
}

/// A duration: a number and a unit, `ms`, `s`, `m` or `h` (`500ms`, `5s`, `2m`).
fn duration(word: &str, line: u32) -> Result<Duration, ParseError> {
    let bad = || {
        err(
            line,
            format!("bad duration {word:?} (a number and ms, s, m or h: 500ms, 5s, 2m)"),
        )
    };
    let split = word.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = word.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(bad)?;
    Ok(Duration::from_millis(ms))
}

/// A label definition `NAME:`: letters, digits, `_`, `-` and `.`, not starting with a digit.
fn label_name(word: &str) -> Option<&str> {
    let name = word.strip_suffix(':')?;
    let mut chars = name.chars();
    let first = chars.next()?;
    let ok = (first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    ok.then_some(name)
}

/// Parses an address expression from `words`, taking as many as it needs: `mem+4`,
/// `mem + 4` and `mem +4` are one expression.
fn expr(
    words: &mut std::iter::Peekable<std::slice::Iter<'_, Token>>,
    line: u32,
) -> Result<Expr, ParseError> {
    let mut text = match words.next() {
        Some(Token::Word(w)) => w.clone(),
        Some(Token::Str(_)) => return Err(err(line, "an address, not a string, was expected")),
        None => return Err(err(line, "an address is missing")),
    };
    loop {
        let continues = text.ends_with(['+', '-'])
            || matches!(words.peek(), Some(Token::Word(w)) if w.starts_with(['+', '-']));
        if !continues {
            break;
        }
        match words.next() {
            Some(Token::Word(w)) => text.push_str(w),
            _ => return Err(err(line, format!("address {text:?} ends with an operator"))),
        }
    }
    let mut terms = Vec::new();
    let mut minus = false;
    let mut rest = text.as_str();
    loop {
        let end = rest.find(['+', '-']).unwrap_or(rest.len());
        let word = &rest[..end];
        if word.is_empty() {
            return Err(err(
                line,
                format!("bad address {text:?}: terms joined by + and -, each a number or mem, limit, start, scratch"),
            ));
        }
        let term = match word {
            "mem" => Term::Name(Name::Mem),
            "limit" => Term::Name(Name::Limit),
            "start" => Term::Name(Name::Start),
            "scratch" => Term::Name(Name::Scratch),
            _ => match number(word) {
                Some(n) => Term::Number(n),
                None if word.starts_with(|c: char| c.is_ascii_digit()) => {
                    return Err(err(
                        line,
                        format!("bad number {word:?} in address {text:?} (decimal, or hex with 0x; at most 64 bits)"),
                    ))
                }
                None => {
                    return Err(err(
                        line,
                        format!("unknown name {word:?} in address {text:?} (the names are mem, limit, start, scratch)"),
                    ))
                }
            },
        };
        terms.push((minus, term));
        if end == rest.len() {
            break;
        }
        minus = rest.as_bytes()[end] == b'-';
        rest = &rest[end + 1..];
    }
    Ok(Expr { terms })
}

/// One value of `write`/`expect`.
fn value(token: &Token, line: u32) -> Result<Value, ParseError> {
    let word = match token {
        Token::Str(bytes) => return Ok(Value::Text(bytes.clone())),
        Token::Word(w) => w,
    };
    let bad = || {
        err(
            line,
            format!("bad value {word:?} (one of \"text\", u8:V, u16:V, u32:V, u64:V, hex:BYTES)"),
        )
    };
    let (kind, v) = word.split_once(':').ok_or_else(bad)?;
    if kind == "hex" {
        if v.len() % 2 != 0 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err(
                line,
                format!("bad value {word:?}: hex: takes pairs of hex digits (hex:DEADBEEF)"),
            ));
        }
        let bytes = (0..v.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        return Ok(Value::Hex(bytes));
    }
    let bits = match kind {
        "u8" => 8,
        "u16" => 16,
        "u32" => 32,
        "u64" => 64,
        _ => return Err(bad()),
    };
    let n = number_or(v, line, kind)?;
    if bits < 64 && n >> bits != 0 {
        return Err(err(
            line,
            format!("value {word:?} does not fit in {bits} bits"),
        ));
    }
    // The casts are checked just above.
    Ok(match bits {
        8 => Value::U8(n as u8),
        16 => Value::U16(n as u16),
        32 => Value::U32(n as u32),
        _ => Value::U64(n),
    })
}

/// What a line is before jumps are resolved.
enum Parsed {
    Op(Op),
    Goto(String),
    Repeat(u64),
    End,
}

fn one_string(args: &[Token], line: u32, usage: &str) -> Result<Vec<u8>, ParseError> {
    match args {
        [Token::Str(s)] => Ok(s.clone()),
        _ => Err(err(line, format!("usage: {usage}"))),
    }
}

fn optional_timeout(
    args: &[Token],
    line: u32,
    usage: &str,
) -> Result<Option<Duration>, ParseError> {
    match args {
        [] => Ok(None),
        [Token::Word(w)] => duration(w, line).map(Some),
        _ => Err(err(line, format!("usage: {usage}"))),
    }
}

fn instruction(name: &str, args: &[Token], line: u32) -> Result<Parsed, ParseError> {
    let addr_and = |usage: &str| -> Result<(Expr, Vec<Token>), ParseError> {
        let mut words = args.iter().peekable();
        let addr = expr(&mut words, line)
            .map_err(|e| err(line, format!("{} (usage: {usage})", e.reason)))?;
        Ok((addr, words.cloned().collect()))
    };
    let op = match name {
        "notify" => {
            let (addr, rest) = addr_and("notify ADDR")?;
            if !rest.is_empty() {
                return Err(err(line, "usage: notify ADDR"));
            }
            Op::Notify(addr)
        }
        "print" => Op::Print(one_string(args, line, "print \"TEXT\"")?),
        "console" => Op::Console(one_string(args, line, "console \"TEXT\"")?),
        "crash" => Op::Crash(one_string(args, line, "crash \"MESSAGE\"")?),
        "kill" => {
            let bytes = one_string(args, line, "kill \"REASON\"")?;
            if bytes.contains(&0) {
                return Err(err(line, "a kill reason cannot contain NUL"));
            }
            if bytes.len() > vmbus::lguest::MAX_REASON_LEN {
                return Err(err(
                    line,
                    format!(
                        "a kill reason is at most {} bytes (this one has {})",
                        vmbus::lguest::MAX_REASON_LEN,
                        bytes.len()
                    ),
                ));
            }
            let reason = String::from_utf8(bytes)
                .map_err(|_| err(line, "a kill reason must be UTF-8 text"))?;
            Op::Kill(reason)
        }
        "restart" => {
            if !args.is_empty() {
                return Err(err(line, "usage: restart (no arguments)"));
            }
            Op::Restart
        }
        "wait-irq" => {
            let usage = "wait-irq N [TIMEOUT]";
            let (Some(Token::Word(n)), rest) = (args.first(), args.get(1..).unwrap_or_default())
            else {
                return Err(err(line, format!("usage: {usage}")));
            };
            let irq = number_or(n, line, "the interrupt")?;
            if irq >= u64::from(vmbus::lguest::LGUEST_IRQS) {
                return Err(err(
                    line,
                    format!(
                        "interrupt {irq} is out of range: LHREQ_IRQ takes 0..{}",
                        vmbus::lguest::LGUEST_IRQS - 1
                    ),
                ));
            }
            Op::WaitIrq {
                irq: irq as u32,
                timeout: optional_timeout(rest, line, usage)?,
            }
        }
        "halt" => Op::Halt {
            timeout: optional_timeout(args, line, "halt [TIMEOUT]")?,
        },
        "sleep" => match args {
            [Token::Word(w)] => Op::Sleep(duration(w, line)?),
            _ => return Err(err(line, "usage: sleep DURATION")),
        },
        "write" | "expect" => {
            let usage = format!("{name} ADDR VALUE...");
            let (addr, rest) = addr_and(&usage)?;
            if rest.is_empty() {
                return Err(err(
                    line,
                    format!("{name} needs at least one value (usage: {usage})"),
                ));
            }
            let values = rest
                .iter()
                .map(|t| value(t, line))
                .collect::<Result<Vec<_>, _>>()?;
            let total: usize = values.iter().map(Value::len).sum();
            if total > MAX_READ_LEN as usize {
                return Err(err(
                    line,
                    format!("{name} of {total} bytes: at most {MAX_READ_LEN} at once"),
                ));
            }
            if name == "write" {
                Op::Write { addr, values }
            } else {
                Op::Expect { addr, values }
            }
        }
        "read" => {
            let (addr, rest) = addr_and("read ADDR LEN")?;
            let [Token::Word(len)] = rest.as_slice() else {
                return Err(err(line, "usage: read ADDR LEN"));
            };
            let n = number_or(len, line, "the length")?;
            if n == 0 || n > u64::from(MAX_READ_LEN) {
                return Err(err(
                    line,
                    format!("read length {n}: it must be 1..{MAX_READ_LEN}"),
                ));
            }
            Op::Read {
                addr,
                len: n as u32,
            }
        }
        "scratch" => {
            let (addr, rest) = addr_and("scratch ADDR")?;
            if !rest.is_empty() {
                return Err(err(line, "usage: scratch ADDR"));
            }
            // `scratch scratch+0x100` moves it along.
            Op::Scratch(addr)
        }
        "goto" => match args {
            [Token::Word(label)] => return Ok(Parsed::Goto(label.clone())),
            _ => return Err(err(line, "usage: goto LABEL")),
        },
        "repeat" => match args {
            [Token::Word(n)] => return Ok(Parsed::Repeat(number_or(n, line, "repeat")?)),
            _ => return Err(err(line, "usage: repeat N ... end")),
        },
        "end" => {
            if !args.is_empty() {
                return Err(err(line, "usage: end (closes a repeat; no arguments)"));
            }
            return Ok(Parsed::End);
        }
        other => {
            return Err(err(
                line,
                format!(
                    "unknown instruction {other:?} (notify, print, wait-irq, halt, sleep, write, \
                     expect, read, console, crash, restart, kill, goto, repeat, end, scratch, \
                     or a label NAME:)"
                ),
            ))
        }
    };
    Ok(Parsed::Op(op))
}

impl Script {
    /// Parses `text`; `name` is what status displays will call it.
    pub fn parse(name: &str, text: &str) -> Result<Script, ParseError> {
        if text.len() > MAX_SCRIPT_LEN {
            return Err(err(
                1,
                format!(
                    "the script has {} bytes; at most {MAX_SCRIPT_LEN}",
                    text.len()
                ),
            ));
        }
        let mut labels: HashMap<String, (usize, u32)> = HashMap::new();
        let mut gotos: Vec<(usize, String, u32)> = Vec::new();
        let mut open: Vec<(usize, u32)> = Vec::new(); // (index of RepeatStart, line)
        let mut program: Vec<Step> = Vec::new();
        let mut slots = 0;
        for (i, text) in text.lines().enumerate() {
            let line = u32::try_from(i + 1).unwrap_or(u32::MAX);
            let tokens = tokenize(text, line)?;
            let mut rest = tokens.as_slice();
            if let Some(Token::Word(w)) = rest.first() {
                if w.ends_with(':') {
                    let Some(name) = label_name(w) else {
                        return Err(err(
                            line,
                            format!("bad label {w:?} (letters, digits, _ - . and a colon; not starting with a digit)"),
                        ));
                    };
                    if let Some(&(_, first)) = labels.get(name) {
                        return Err(err(
                            line,
                            format!("label {name:?} is defined twice (first on line {first})"),
                        ));
                    }
                    labels.insert(name.to_owned(), (program.len(), line));
                    rest = &rest[1..];
                }
            }
            let Some((first, args)) = rest.split_first() else {
                continue;
            };
            let Token::Word(name) = first else {
                return Err(err(line, "a line starts with an instruction, not a string"));
            };
            let here = program.len();
            let op = match instruction(name, args, line)? {
                Parsed::Op(op) => op,
                Parsed::Goto(label) => {
                    gotos.push((here, label, line));
                    Op::Goto(usize::MAX)
                }
                Parsed::Repeat(count) => {
                    open.push((here, line));
                    slots += 1;
                    Op::RepeatStart {
                        slot: slots - 1,
                        count,
                        end: usize::MAX,
                    }
                }
                Parsed::End => {
                    let Some((start, _)) = open.pop() else {
                        return Err(err(line, "end without repeat"));
                    };
                    let Op::RepeatStart { slot, end, .. } = &mut program[start].op else {
                        return Err(err(line, "end without repeat"));
                    };
                    *end = here + 1;
                    Op::RepeatEnd {
                        slot: *slot,
                        body: start + 1,
                    }
                }
            };
            program.push(Step { line, op });
        }
        if let Some(&(_, line)) = open.last() {
            return Err(err(line, "repeat without end"));
        }
        for (at, label, line) in gotos {
            let Some(&(target, _)) = labels.get(&label) else {
                return Err(err(line, format!("unknown label {label:?}")));
            };
            program[at].op = Op::Goto(target);
        }
        Ok(Script {
            name: name.to_owned(),
            program,
            repeat_slots: slots,
        })
    }

    /// A built-in script by name (`console-hello`, ...), named `builtin:NAME`.
    pub fn builtin(name: &str) -> Option<Script> {
        let (_, text) = BUILTINS.iter().find(|(n, _)| *n == name)?;
        Script::parse(&format!("builtin:{name}"), text).ok()
    }

    /// The script a Guest runs when nobody chose one.
    pub fn default_script() -> Script {
        // The fixture is checked by a unit test; an empty script (the Guest idles) is the
        // fallback rather than a panic.
        Script::builtin(DEFAULT_BUILTIN).unwrap_or_else(|| Script {
            name: format!("builtin:{DEFAULT_BUILTIN}"),
            program: Vec::new(),
            repeat_slots: 0,
        })
    }

    /// The line of instruction `pc` (the last line + 1 past the end).
    pub fn line_of(&self, pc: usize) -> u32 {
        match self.program.get(pc) {
            Some(step) => step.line,
            None => self.program.last().map_or(1, |s| s.line + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Script, ParseError> {
        Script::parse("t", text)
    }

    fn parse_err(text: &str) -> (u32, String) {
        let e = parse(text).expect_err("parsed");
        (e.line, e.reason)
    }

    fn ops(text: &str) -> Vec<Op> {
        parse(text)
            .unwrap()
            .program
            .into_iter()
            .map(|s| s.op)
            .collect()
    }

    fn num(n: u64) -> Expr {
        Expr {
            terms: vec![(false, Term::Number(n))],
        }
    }

    #[test]
    fn every_builtin_and_fixture_parses() {
        for (name, text) in BUILTINS {
            let script = Script::parse(name, text).unwrap_or_else(|e| panic!("{name}:{e}"));
            assert!(!script.program.is_empty(), "{name}");
        }
        let hello = Script::default_script();
        assert_eq!(hello.name, "builtin:console-hello");
        assert_eq!(
            hello
                .program
                .iter()
                .map(|s| s.op.clone())
                .collect::<Vec<_>>(),
            vec![
                Op::Console(b"hello from the fake guest\n".to_vec()),
                Op::Crash(b"Power down".to_vec())
            ]
        );
    }

    #[test]
    fn pingpong_fixture_is_a_thousand_rounds_then_a_crash() {
        let script = Script::builtin("pingpong").unwrap();
        let lines: Vec<(u32, Op)> = script
            .program
            .iter()
            .map(|s| (s.line, s.op.clone()))
            .collect();
        assert_eq!(
            lines,
            vec![
                (
                    6,
                    Op::RepeatStart {
                        slot: 0,
                        count: 1000,
                        end: 4
                    }
                ),
                (7, Op::Notify(num(0x1000))),
                (
                    8,
                    Op::WaitIrq {
                        irq: 3,
                        timeout: Some(Duration::from_secs(10))
                    }
                ),
                (9, Op::RepeatEnd { slot: 0, body: 1 }),
                (10, Op::Crash(b"pingpong done".to_vec())),
            ]
        );
    }

    #[test]
    fn comments_blank_lines_and_labels() {
        let script =
            parse("# a comment\n\n  loop:   # a label\nnotify 0x10 # trailing\nnext: goto loop\n")
                .unwrap();
        assert_eq!(
            script.program,
            vec![
                Step {
                    line: 4,
                    op: Op::Notify(num(0x10))
                },
                Step {
                    line: 5,
                    op: Op::Goto(0)
                },
            ]
        );
        // A label at the very end points past the last instruction (the Guest idles).
        assert_eq!(ops("goto out\nout:"), vec![Op::Goto(1)]);
    }

    #[test]
    fn strings_take_the_documented_escapes() {
        assert_eq!(
            ops(r#"print "a\n\t\\\"\0\x41\xff é # not a comment""#),
            vec![Op::Print(
                b"a\n\t\\\"\0A\xff \xc3\xa9 # not a comment".to_vec()
            )]
        );
        assert_eq!(
            quote(b"a\n\t\\\"\0A\xff\x01 \xc3\xa9"),
            r#""a\n\t\\\"\0A\xff\x01 é""#
        );
    }

    #[test]
    fn expressions_join_terms_with_plus_and_minus() {
        let e = |text: &str| match ops(&format!("notify {text}")).remove(0) {
            Op::Notify(e) => e,
            _ => unreachable!(),
        };
        let value = |e: &Expr| {
            e.eval(|name| {
                Ok::<u64, ()>(match name {
                    Name::Mem => 0x100_0000,
                    Name::Limit => 0x100_7000,
                    Name::Start => 0x10_0000,
                    Name::Scratch => 0x8_0000,
                })
            })
            .unwrap()
        };
        assert_eq!(value(&e("mem+4")), 0x100_0004);
        assert_eq!(value(&e("mem + 4")), 0x100_0004);
        assert_eq!(value(&e("mem +4")), 0x100_0004);
        assert_eq!(value(&e("limit - 16")), 0x100_6ff0);
        assert_eq!(value(&e("start+scratch-0x10_0000")), 0x8_0000);
        assert_eq!(value(&e("4096")), 4096);
        assert_eq!(value(&e("0-1")), u64::MAX);
        assert!(e("mem+4").uses(Name::Mem));
        assert!(!e("limit").uses(Name::Mem));
    }

    #[test]
    fn values_lay_out_little_endian() {
        let Op::Write { values, .. } =
            ops(r#"write 0x100 "ab" u8:1 u16:0x0203 u32:0x04050607 u64:8 hex:DEADbeef"#).remove(0)
        else {
            unreachable!()
        };
        let bytes: Vec<u8> = values.iter().flat_map(Value::bytes).collect();
        assert_eq!(
            bytes,
            [b'a', b'b', 1, 3, 2, 7, 6, 5, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef]
        );
        assert_eq!(Value::U16(3).show_like(&[7, 0]), "u16:0x7");
        assert_eq!(Value::Text(vec![]).show_like(b"x\n"), "\"x\\n\"");
        assert_eq!(Value::Hex(vec![]).show_like(&[1, 0xab]), "hex:01ab");
    }

    #[test]
    fn durations_and_repeats() {
        assert_eq!(
            ops("wait-irq 31 500ms\nhalt 2m\nhalt\nsleep 5s\nsleep 1h"),
            vec![
                Op::WaitIrq {
                    irq: 31,
                    timeout: Some(Duration::from_millis(500))
                },
                Op::Halt {
                    timeout: Some(Duration::from_secs(120))
                },
                Op::Halt { timeout: None },
                Op::Sleep(Duration::from_secs(5)),
                Op::Sleep(Duration::from_secs(3600)),
            ]
        );
        assert_eq!(show_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(show_duration(Duration::from_secs(10)), "10s");
        assert_eq!(show_duration(Duration::from_secs(120)), "2m");
        let nested = parse("repeat 2\nrepeat 3\nrestart\nend\nend\nrestart").unwrap();
        assert_eq!(nested.repeat_slots, 2);
        assert_eq!(
            nested
                .program
                .iter()
                .map(|s| s.op.clone())
                .collect::<Vec<_>>(),
            vec![
                Op::RepeatStart {
                    slot: 0,
                    count: 2,
                    end: 5
                },
                Op::RepeatStart {
                    slot: 1,
                    count: 3,
                    end: 4
                },
                Op::Restart,
                Op::RepeatEnd { slot: 1, body: 2 },
                Op::RepeatEnd { slot: 0, body: 1 },
                Op::Restart,
            ]
        );
    }

    #[test]
    fn every_mistake_is_found_at_parse_time_with_its_line() {
        let cases: &[(&str, u32, &str)] = &[
            (
                "notify 1\nfrobnicate 3",
                2,
                "unknown instruction \"frobnicate\"",
            ),
            ("\n\nnotify 0xZZ", 3, "bad number \"0xZZ\""),
            ("notify 99999999999999999999", 1, "bad number"),
            ("notify mem+", 1, "ends with an operator"),
            ("notify mem++4", 1, "bad address"),
            ("notify ram", 1, "unknown name \"ram\""),
            ("notify", 1, "an address is missing"),
            ("notify \"x\"", 1, "not a string"),
            ("notify 1 2", 1, "usage: notify ADDR"),
            ("goto nowhere", 1, "unknown label \"nowhere\""),
            (
                "a:\n\na:",
                3,
                "label \"a\" is defined twice (first on line 1)",
            ),
            ("9lives:", 1, "bad label"),
            ("print \"abc", 1, "unterminated string"),
            ("print \"abc\\", 1, "unterminated string"),
            ("print \"\\q\"", 1, "bad escape \\q"),
            ("print \"\\x4\"", 1, "bad escape \\x4\""),
            ("print abc", 1, "usage: print \"TEXT\""),
            ("print \"a\" \"b\"", 1, "usage: print"),
            ("print x\"a\"", 1, "a string must stand on its own"),
            ("notify 1\nrepeat 3\nnotify 2", 2, "repeat without end"),
            ("repeat 2\nrepeat 3\nend", 1, "repeat without end"),
            ("end", 1, "end without repeat"),
            ("repeat x\nend", 1, "bad number \"x\""),
            ("wait-irq 32", 1, "interrupt 32 is out of range"),
            ("wait-irq", 1, "usage: wait-irq"),
            ("wait-irq 3 10", 1, "bad duration \"10\""),
            ("wait-irq 3 10x", 1, "bad duration"),
            ("halt 5s 6s", 1, "usage: halt"),
            ("sleep", 1, "usage: sleep"),
            ("write 0x10", 1, "write needs at least one value"),
            ("write 0x10 u9:3", 1, "bad value \"u9:3\""),
            ("write 0x10 7", 1, "bad value \"7\""),
            ("expect 0x10 u8:256", 1, "does not fit in 8 bits"),
            ("expect 0x10 u16:0x10000", 1, "does not fit in 16 bits"),
            ("write 0x10 hex:abc", 1, "pairs of hex digits"),
            ("write 0x10 hex:zz", 1, "pairs of hex digits"),
            ("read 0x10", 1, "usage: read ADDR LEN"),
            ("read 0x10 0", 1, "read length 0"),
            ("read 0x10 65537", 1, "read length 65537"),
            ("kill \"a\\0b\"", 1, "cannot contain NUL"),
            ("kill \"\\xff\"", 1, "must be UTF-8"),
            ("restart now", 1, "usage: restart"),
            ("end 3", 1, "usage: end"),
            ("\"lonely\"", 1, "not a string"),
        ];
        for &(text, line, reason) in cases {
            let (got_line, got) = parse_err(text);
            assert_eq!(got_line, line, "{text:?}: {got}");
            assert!(got.contains(reason), "{text:?}: {got:?} lacks {reason:?}");
        }
        let long = format!("kill \"{}\"", "x".repeat(1025));
        assert!(parse_err(&long).1.contains("at most 1024 bytes"));
        assert_eq!(
            ParseError {
                line: 3,
                reason: "unknown label \"x\"".into()
            }
            .in_file("a.guest"),
            "a.guest:3: unknown label \"x\""
        );
    }
}
