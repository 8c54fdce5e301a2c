//! JSON numbers by their exact decimal value, never through `f64` or `u64`.

use super::write::Sink;

/// A number's parts, as offsets into the body.
#[derive(Debug, Clone, Copy)]
pub(super) struct Number {
    negative: bool,
    /// The digits before the point.
    int: (usize, usize),
    /// The digits after the point (empty when there is no point).
    frac: (usize, usize),
    /// The exponent's digits (empty when there is no exponent), and its sign.
    exp: (usize, usize),
    exp_negative: bool,
    start: usize,
    /// The offset just past the number.
    pub(super) end: usize,
}

/// The largest count of zeros a number is written out with; past it, an exponent.
const MAX_ZEROS: i128 = 20;

/// The most digits an exponent may have to be normalised; a longer one is kept as sent.
const MAX_EXP_DIGITS: usize = 18;

impl Number {
    /// Parses the number at `at` (RFC 8259: `-? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)?`);
    /// `None` when there is none.
    pub(super) fn parse(body: &[u8], at: usize) -> Option<Self> {
        let digits = |from: usize| {
            from + body
                .get(from..)
                .unwrap_or_default()
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        let start = at;
        let negative = body.get(at) == Some(&b'-');
        let at = at + usize::from(negative);
        let int_end = match body.get(at) {
            Some(b'0') => at + 1,
            Some(b'1'..=b'9') => digits(at),
            _ => return None,
        };
        let mut end = int_end;
        let mut frac = (end, end);
        if body.get(end) == Some(&b'.') {
            let frac_end = digits(end + 1);
            if frac_end == end + 1 {
                return None;
            }
            frac = (end + 1, frac_end);
            end = frac_end;
        }
        let mut exp = (end, end);
        let mut exp_negative = false;
        if let Some(b'e' | b'E') = body.get(end) {
            let mut from = end + 1;
            match body.get(from) {
                Some(b'-') => {
                    exp_negative = true;
                    from += 1;
                }
                Some(b'+') => from += 1,
                _ => {}
            }
            let exp_end = digits(from);
            if exp_end == from {
                return None;
            }
            exp = (from, exp_end);
            end = exp_end;
        }
        Some(Self {
            negative,
            int: (at, int_end),
            frac,
            exp,
            exp_negative,
            start,
            end,
        })
    }

    /// Writes the number's one form. Its value is `digits × 10^power`, `digits` with no
    /// leading or trailing zero: zero, of either sign, is `0`; with `0 <= power <= 20` the
    /// number is written in full (`100`, `-5`, `123000`); otherwise as `digits`, `e`, `power`
    /// (`15e-1` for `1.5`, `1e21`). An exponent of more than 18 digits is kept as sent.
    pub(super) fn write(&self, body: &[u8], out: &mut impl Sink) {
        let int = &body[self.int.0..self.int.1];
        let frac = &body[self.frac.0..self.frac.1];
        let zeros = |digits: &[u8]| digits.iter().take_while(|&&b| b == b'0').count();
        let trailing_zeros =
            |digits: &[u8]| digits.iter().rev().take_while(|&&b| b == b'0').count();
        // The integer part is `0` or starts with a non-zero digit.
        let int = &int[zeros(int)..];
        let frac = if int.is_empty() {
            &frac[zeros(frac)..]
        } else {
            frac
        };
        let frac_trail = trailing_zeros(frac);
        if int.is_empty() && frac_trail == frac.len() {
            out.byte(b'0');
            return;
        }
        let exp = &body[self.exp.0..self.exp.1];
        let exp = &exp[zeros(exp)..];
        if exp.len() > MAX_EXP_DIGITS {
            out.bytes(&body[self.start..self.end]);
            return;
        }
        let exp = exp
            .iter()
            .fold(0i128, |n, &d| n * 10 + i128::from(d - b'0'));
        let exp = if self.exp_negative { -exp } else { exp };
        if self.negative {
            out.byte(b'-');
        }
        // The significant digits, and the power of ten of the last one. The fraction's length
        // counts from the point, leading zeros stripped or not: they are significant places.
        let frac_len = (self.frac.1 - self.frac.0) as i128;
        let power = if frac_trail == frac.len() {
            let int_trail = trailing_zeros(int);
            out.bytes(&int[..int.len() - int_trail]);
            exp + int_trail as i128
        } else {
            out.bytes(int);
            out.bytes(&frac[..frac.len() - frac_trail]);
            exp - frac_len + frac_trail as i128
        };
        if (0..=MAX_ZEROS).contains(&power) {
            for _ in 0..power {
                out.byte(b'0');
            }
        } else {
            out.byte(b'e');
            write_int(out, power);
        }
    }
}

/// Writes `n` in decimal, without allocating.
fn write_int(out: &mut impl Sink, n: i128) {
    let mut digits = [0u8; 40];
    let mut at = digits.len();
    let mut m = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        digits[at] = b'-';
    }
    out.bytes(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one form of the number `text`, or `None` when it is not one whole number.
    fn form(text: &str) -> Option<String> {
        let number = Number::parse(text.as_bytes(), 0)?;
        if number.end != text.len() {
            return None;
        }
        let mut out = Vec::new();
        number.write(text.as_bytes(), &mut out);
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn grammar() {
        for good in [
            "0", "-0", "1", "-12", "0.5", "1e5", "1E+5", "1e-5", "0.0e0", "10.01",
        ] {
            assert!(form(good).is_some(), "{good}");
        }
        for bad in [
            "", "-", "+1", "01", ".5", "1.", "1e", "1e+", "-a", "0x1", "1.e5", "--1",
        ] {
            assert_eq!(form(bad), None, "{bad}");
        }
    }

    #[test]
    fn one_form_per_value() {
        let cases: &[(&str, &[&str])] = &[
            (
                "0",
                &[
                    "0",
                    "-0",
                    "0.0",
                    "-0.000",
                    "0e10",
                    "0.0e-99999999999999999999999",
                ],
            ),
            (
                "1",
                &[
                    "1", "1.0", "1e0", "10e-1", "0.1e1", "0.001e3", "1.000E+0", "100e-2",
                ],
            ),
            ("-1", &["-1", "-1.0", "-10e-1"]),
            ("100", &["100", "1e2", "1.00e2", "0.1e3", "100.000"]),
            ("15e-1", &["1.5", "15e-1", "0.15e1", "1.50", "150e-2"]),
            ("105e-1", &["10.5", "1.05e1", "0.105e2"]),
            ("1e-3", &["0.001", "1e-3", "0.0010", "10e-4"]),
            ("123000", &["123000", "123e3", "1.23e5"]),
            ("100000000000000000000", &["1e20", "100000000000000000000"]),
            ("1e21", &["1e21", "1000000000000000000000", "10e20"]),
            ("18446744073709551615", &["18446744073709551615"]),
            ("-9223372036854775808", &["-9223372036854775808"]),
            (
                "1e1000000000000000000",
                &["1e1000000000000000000", "10e999999999999999999"],
            ),
            ("-314159e-5", &["-3.14159", "-314159e-5"]),
            (
                "1e-999999999999999999",
                &["1e-999999999999999999", "0.1e-999999999999999998"],
            ),
        ];
        for (expected, texts) in cases {
            for text in *texts {
                assert_eq!(form(text).as_deref(), Some(*expected), "{text}");
                // The form is its own form.
                assert_eq!(form(expected).as_deref(), Some(*expected), "{expected}");
            }
        }
    }

    #[test]
    fn big_integers_keep_every_digit() {
        // Both are 1e20 as an f64.
        assert_eq!(
            form("100000000000000000001").unwrap(),
            "100000000000000000001"
        );
        assert_ne!(form("100000000000000000001"), form("100000000000000000002"));
        let long = format!("1{}1", "0".repeat(5000));
        assert_eq!(form(&long).unwrap(), long);
        assert_ne!(form("0.1000000000000000000001"), form("0.1"));
    }

    #[test]
    fn huge_exponents_are_kept_as_sent() {
        // More than 18 digits: not normalised, yet never equal to another value's form.
        assert_eq!(
            form("1e1234567890123456789").unwrap(),
            "1e1234567890123456789"
        );
        assert_eq!(
            form("1.0e+0001234567890123456789").unwrap(),
            "1.0e+0001234567890123456789"
        );
        // Leading zeros of an exponent do not count.
        assert_eq!(form("1e0000000000000000000000000003").unwrap(), "1000");
    }

    #[test]
    fn integers_are_written_as_serde_json_writes_them() {
        for n in [0i64, 1, -1, 7, 10, 1000, i64::MIN, i64::MAX, 120, -4500] {
            assert_eq!(form(&n.to_string()).unwrap(), n.to_string());
        }
        assert_eq!(form(&u64::MAX.to_string()).unwrap(), u64::MAX.to_string());
    }
}
