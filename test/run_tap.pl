# test/run_tap.pl - run TAP test files and write "PASSED FAILED" (assertion
# counts) to the file named by the first argument, for scripts/test.
use strict;
use warnings;
use TAP::Harness;

my ($counts_file, @files) = @ARGV;
my $harness = TAP::Harness->new({ verbosity => 0, merge => 1, color => 0, timer => 1 });
my $agg = $harness->runtests(@files);

my ($passed, $failed) = (0, 0);
for my $file ($agg->descriptions)
{
	my ($parser) = $agg->parsers($file);
	my $bad = scalar(my @f = $parser->failed);
	$passed += scalar(my @p = $parser->passed);
	# a file that died, or ran a different number of tests than planned,
	# counts as a failure even when no single assertion failed
	$bad = 1 if !$bad && ($parser->exit || $parser->parse_errors);
	$failed += $bad;
}

open my $fh, '>', $counts_file or die "cannot write $counts_file: $!";
print $fh "$passed $failed\n";
close $fh;

# print the logs of failing files, so a CI log says why
if ($failed)
{
	my $logdir = ($ENV{TESTDIR} // '.') . '/tmp_check/log';
	for my $log (glob "$logdir/regress_log_*")
	{
		print "\n----- tail of $log -----\n";
		system('tail', '-n', '60', $log);
	}
}
exit($failed ? 1 : 0);
